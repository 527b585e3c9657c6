"""A real mosquitto broker (Debian's `mosquitto` package; MQTT 3.1.1 and 5) for the tests of the
MQTT source: a listener on a free port of 127.0.0.1, its persistence in a test directory, killed
on exit. `kill()` and `start()` again restart it on the same port with the same sessions.

Without the executable the tests skip; under CI=true they fail instead.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

START_TIMEOUT = 10.0  # s for the broker to listen


class Mosquitto:
    """`inflight`: the broker's max_inflight_messages (what it sends an MQTT 3.1.1 client before
    the PUBACKs; a version 5 client sets its own with Receive Maximum)."""

    def __init__(self, directory: Path, inflight: int = 20) -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.inflight = inflight
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def start(self) -> None:
        binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto",) if os.path.exists(p)), None
        )
        if binary is None:
            missing = "no mosquitto executable: install it (apt-get install mosquitto)"
            if os.environ.get("CI") == "true":
                pytest.fail(missing)
            pytest.skip(missing)
        conf = self._configure()
        with open(self.directory / "mosquitto.out", "ab") as out:
            self._process = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            self._wait_for_port()
        except BaseException:
            self.kill()
            raise

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """End the broker (SIGKILL: as in a crash; SIGTERM: it saves its sessions first)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(sig)
            self._process.wait()
        self._process = None

    def _configure(self) -> Path:
        store = self.directory / "store"
        store.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"user {getpass.getuser()}\n"  # as root it would switch to user mosquitto
            "persistence true\n"
            f"persistence_location {store}/\n"
            "autosave_on_changes true\n"  # save after every change: a SIGKILL loses nothing
            "autosave_interval 1\n"
            f"max_inflight_messages {self.inflight}\n"
            "max_queued_messages 10000\n"
            f"log_dest file {self.directory / 'mosquitto.log'}\n"
            "log_type all\n"
        )
        return conf

    def _wait_for_port(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                log = self.directory / "mosquitto.out"
                pytest.fail(f"mosquitto exited:\n{log.read_text(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
                return
            except OSError:
                time.sleep(0.02)
        pytest.fail(f"mosquitto did not listen in {START_TIMEOUT:.0f} s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
