"""A real `ember up` in a subprocess (free port, temporary home), driven over HTTP and the CLI."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ember_cmd() -> list[str]:
    script = Path(sys.executable).with_name("ember")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ember.cli.main"]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class EmberServer:
    def __init__(self, home: Path, extra: list[str], prefix: list[str] | None = None) -> None:
        self.home = home
        self.extra = extra
        self.prefix = prefix or []  # e.g. a wrapper that runs the server unprivileged
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "server.log"
        self.http = httpx.Client(base_url=self.url, timeout=60)  # as anyone: no key
        self.api = httpx.Client(base_url=self.url, timeout=60)  # with the admin key, once started

    def start(self) -> EmberServer:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    *ember_cmd(),
                    "up",
                    "--home",
                    str(self.home),
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                    *self.extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,  # its own process group, as in a terminal
            )
        wait_for(self.healthy, 20, "the server to answer /healthz")
        self.admin_key = (self.home / "credentials").read_text().strip()
        self.api.headers["Authorization"] = f"Bearer {self.admin_key}"
        return self

    def env(self) -> dict[str, str]:
        return {**os.environ, "EMBER_URL": self.url, "EMBER_HOME": str(self.home)}

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"ember up exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return self.http.get("/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30, group: bool = False) -> int:
        """Signal the server (or, with `group`, its whole process group, as Ctrl-C does)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("ember up did not exit after the signal") from None
        return self.proc.returncode

    def cli(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run(
            [*ember_cmd(), *args], input=input, capture_output=True, env=self.env(), timeout=120
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"ember {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout.decode()}\n{done.stderr.decode()}"
            )
        return done

    def deploy(self, directory: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
        return self.cli("deploy", str(directory), *args)


def make_function(
    root: Path,
    name: str,
    code: str,
    manifest: str | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "handler.py").write_text(textwrap.dedent(code))
    if manifest is not None:
        (directory / "ember.yaml").write_text(textwrap.dedent(manifest))
    for rel, data in (files or {}).items():
        (directory / rel).write_bytes(data)
    return directory


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., EmberServer]]:
    servers: list[EmberServer] = []

    def start(
        *extra: str, home: Path | None = None, prefix: list[str] | None = None
    ) -> EmberServer:
        srv = EmberServer(home or tmp_path / f"home{len(servers)}", list(extra), prefix)
        servers.append(srv)
        return srv.start()

    yield start
    for srv in servers:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)
        srv.http.close()
        srv.api.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmberServer]:
    srv = EmberServer(tmp_path_factory.mktemp("ember-home"), []).start()
    yield srv
    code = srv.stop()
    srv.http.close()
    srv.api.close()
    assert code == 0, srv.output()


@pytest.fixture
def fn_dir(tmp_path: Path) -> Callable[..., Path]:
    def make(
        name: str, code: str, manifest: str | None = None, files: dict[str, bytes] | None = None
    ) -> Path:
        return make_function(tmp_path / "src", name, code, manifest, files)

    return make


class Gate:
    """Holds requests inside a function until the test opens it, so a test knows what is
    running without timing it: a handler given `?gate=PORT` connects to the gate and waits
    for it to close the connection (GATED below; an async handler reads from an asyncio
    connection the same way)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._held: list[socket.socket] = []
        self._open = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            with self._lock:
                if self._open:
                    conn.close()
                else:
                    self._held.append(conn)

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def wait(self, count: int, what: str = "requests at the gate") -> None:
        wait_for(lambda: self.held() >= count, 30, f"{count} {what}")
        assert self.held() == count, f"{self.held()} requests at the gate, not {count}"

    def open(self) -> None:
        with self._lock:
            self._open = True
            for conn in self._held:
                conn.close()
            self._held.clear()

    def __enter__(self) -> Gate:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.open()
        self._server.close()


GATED = """
import os, socket, time

def gate(req):
    if "gate" in req.query:  # held until the test opens the gate
        with socket.create_connection(("127.0.0.1", int(req.query["gate"]))) as sock:
            sock.recv(1)
"""


def one_file_bundle(code: bytes) -> bytes:
    """A deploy bundle (.tar.gz) holding `handler.py` with `code`, for POST /api/v1/deploy."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("handler.py")
        info.size = len(code)
        tar.addfile(info, io.BytesIO(code))
    return buf.getvalue()


def named(name: str) -> list[psutil.Process]:
    """Live processes whose name (/proc/PID/comm) is `name`: a function names its own zygote
    at import, so its instances inherit the name (cgroup names do not say which function: a
    zygote started from a spare keeps the spare's)."""
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == name and alive(p)]


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
