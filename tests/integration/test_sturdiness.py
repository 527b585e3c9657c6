"""Regression tests for the sturdiness review (issue 8): each against a real `ember up`."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.conftest import GATED, EmberServer, Gate, wait_for

HELLO = """
def handle(req, ctx):
    return {"ok": True}
"""


def _bundle(handler: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = handler.encode()
        info = tarfile.TarInfo("handler.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_scale_to_zero_holds_while_the_window_remembers_load(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """`ember scale --instances 0` holds 0 for scale.idle (60 s by default): the autoscaler
    must not bring an instance back because its stable window still remembers the load."""
    server = server_factory()
    server.deploy(fn_dir("held", HELLO))
    info = lambda: server.api.get("/api/v1/functions/held").json()  # noqa: E731
    for _ in range(20):
        assert server.http.get("/fn/held").status_code == 200
    wait_for(lambda: info()["autoscaler"]["desired"] >= 1, 5, "the autoscaler to see the load")
    server.cli("scale", "held", "--instances", "0")
    held = lambda: info()["autoscaler"]["desired"] == 0 and info()["instances"]["idle"] == 0  # noqa: E731
    wait_for(held, 5, "the autoscaler to hold 0 instances")
    resp = server.http.get("/fn/held")  # a request still starts what it needs
    assert resp.headers["x-ember-start"] == "fork"
    wait_for(held, 5, "the hold to stop the request's instance again once idle")


class PidsLimit:
    """A pids cgroup of the test's own, to make the kernel refuse forks (EAGAIN) on purpose."""

    def __init__(self) -> None:
        v1 = Path("/sys/fs/cgroup/pids")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "cgroup.procs").exists():
            self.parent = v1
        elif "pids" in (v2 / "cgroup.subtree_control").read_text(errors="replace").split():
            self.parent = v2
        else:
            raise OSError("no pids controller")
        self.dir = self.parent / f"ember-test-{os.getpid()}"
        self.dir.mkdir()
        (self.dir / "pids.max").write_text("1")

    def hold(self, pid: int) -> None:
        (self.dir / "cgroup.procs").write_text(str(pid))

    def release(self, pid: int) -> None:
        (self.parent / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        for pid in (self.dir / "cgroup.procs").read_text().split():
            self.release(int(pid))
        self.dir.rmdir()


def _pids_limit() -> PidsLimit:
    try:
        return PidsLimit()
    except OSError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs as root with a pids cgroup controller: {exc}")
        pytest.skip(f"needs root and a pids cgroup controller: {exc}")


def _root_zygote(server: EmberServer) -> psutil.Process:
    assert server.proc is not None
    for child in psutil.Process(server.proc.pid).children():
        if "ember.runtime.root" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no root zygote below the server")


def test_a_failed_fork_in_the_root_zygote_fails_one_start_not_the_node(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """Regression: one EAGAIN from fork() in the root zygote ended it, and PDEATHSIG then took
    every zygote and instance of every tenant with it."""
    server = server_factory("--no-sandbox")
    server.deploy(fn_dir("alive", HELLO))
    assert server.http.get("/fn/alive").headers["x-ember-start"] == "fork"
    root = _root_zygote(server)
    limit = _pids_limit()
    try:
        limit.hold(root.pid)
        resp = server.api.post("/api/v1/deploy", params={"name": "starved"}, content=_bundle(HELLO))
        assert resp.status_code == 503, resp.text
        error = resp.json()["error"]
        assert error["code"] == "fork_failed", error
        assert "fork failed" in error["message"] and "retry later" in error["message"]
        assert root.is_running() and root.status() != psutil.STATUS_ZOMBIE
        warm = server.http.get("/fn/alive")  # the other function's instance lived on
        assert warm.status_code == 200 and warm.headers["x-ember-start"] == "warm"
    finally:
        limit.remove()
    resp = server.api.post("/api/v1/deploy", params={"name": "starved"}, content=_bundle(HELLO))
    assert resp.status_code == 201, resp.text
    assert server.http.get("/fn/starved").headers["x-ember-start"] == "fork"
    assert _root_zygote(server).pid == root.pid


BIG = """
import asyncio

def make():
    return b"x" * (65 * 1024 * 1024)

{kind}
"""
BIG_SYNC = "def handle(req, ctx):\n    return make()\n"
BIG_ASYNC = (
    "async def handle(req, ctx):\n"
    "    if req.path == '/cancel':\n"
    "        raise asyncio.CancelledError()\n"
    "    return make()\n"
)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_result_over_the_frame_limit_is_a_502_naming_it_at_once(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path], kind: str
) -> None:
    """Regression: an async handler whose result could not be sent left the request hanging
    until its timeout (504); both kinds answer at once with the limit named. The function's
    timeout (10 min) is far beyond the client's (60 s): a hang fails the test."""
    server = server_factory()
    code = BIG.format(kind=BIG_SYNC if kind == "sync" else BIG_ASYNC)
    server.deploy(fn_dir("big", code, "functions:\n  big:\n    memory: 512\n    timeout: 10m\n"))
    resp = server.http.get("/fn/big")
    assert resp.status_code == 502, resp.text[:300]
    body = resp.json()
    assert body["errorType"] == "ResponseTooLarge"
    assert "65.0 MiB exceeds the 64 MiB limit" in body["errorMessage"]
    again = server.http.get("/fn/big")  # the instance lives on
    assert again.status_code == 502 and again.headers["x-ember-start"] == "warm"
    if kind == "async":
        cancelled = server.http.get("/fn/big/cancel")
        assert cancelled.status_code == 500
        assert cancelled.json()["errorType"] == "CancelledError"


def _reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (bounded by the socket's timeout)."""
    sock.settimeout(30)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_connections_beyond_the_limit_get_503_and_slow_heads_get_408(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """Regression: no connection limit, and a head could trickle in forever (slow loris)."""
    server = server_factory("--max-connections", "8", "--head-timeout", "1")
    server.deploy(fn_dir("ok", HELLO))
    server.http.close()  # no keep-alive connection of the test's own counts against the 8
    loris = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    try:
        for sock in loris:
            sock.sendall(b"GET /fn/ok HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            refused = _reply(extra)
        assert refused.startswith(b"HTTP/1.1 503 "), refused[:200]
        assert b"too_many_connections" in refused and b"retry-after: 1" in refused
        timed_out = _reply(loris[0])
        assert timed_out.startswith(b"HTTP/1.1 408 "), timed_out[:200]
        assert b"did not arrive within 1 s" in timed_out
    finally:
        for sock in loris:
            sock.close()
    wait_for(
        lambda: httpx.get(f"{server.url}/fn/ok", timeout=5).status_code == 200,
        10,
        "the server to serve again once the slow connections are gone",
    )


SLOW = (
    GATED
    + """
def handle(req, ctx):
    gate(req)
    return {"got": len(req.body)}
"""
)


def test_request_bodies_held_at_once_are_bounded_with_a_503(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """Regression: every request buffered up to 6 MB before admission, with no total bound."""
    server = server_factory("--max-buffered-mb", "8")
    server.deploy(fn_dir("slow", SLOW, "functions:\n  slow:\n    concurrency: 4\n"))
    body = b"x" * (5 * 1024 * 1024)
    with Gate() as gate, ThreadPoolExecutor(1) as pool:
        held = f"{server.url}/fn/slow?gate={gate.port}"
        first = pool.submit(httpx.post, held, content=body, timeout=60)
        gate.wait(1, "the first request, its body read, held in the function")
        second = httpx.post(f"{server.url}/fn/slow", content=body, timeout=60)
        assert second.status_code == 503, second.text[:300]
        assert second.json()["error"]["code"] == "server_busy"
        assert "limit is 8 MB" in second.json()["error"]["message"]
        assert second.headers["retry-after"] == "1"
        gate.open()
        assert first.result().json() == {"got": len(body)}
    again = httpx.post(f"{server.url}/fn/slow", content=body, timeout=60)  # held bytes came back
    assert again.status_code == 200 and again.json() == {"got": len(body)}


def test_an_installation_under_tmp_is_visible_inside_the_sandbox(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """Regression: Ember's own environment under /tmp was hidden by the sandbox's private
    /tmp, so its zygotes could not run. The environment is bound in (its site-packages shows
    only the runtime's own entries: what else it holds is the server's, not the function's)."""
    import sys
    import tempfile
    import venv

    with tempfile.TemporaryDirectory(dir="/tmp", prefix="ember-venv-") as tmp:
        env = Path(tmp) / "venv"
        venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
        site = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
        site = site / "site-packages"
        ours = [p for p in sys.path if p.endswith("site-packages")] + [
            str(Path(__file__).resolve().parents[2] / "src")
        ]
        (site / "ember-test.pth").write_text("\n".join(ours) + "\n")
        (site / "under_tmp.py").write_text("WHERE = __file__\n")
        server = server_factory(prefix=[str(env / "bin" / "python")])
        code = (
            "import importlib.util, os, sys\n\ndef handle(req, ctx):\n"
            "    return {'prefix': sys.prefix, 'cfg': os.path.isfile(sys.prefix + '/pyvenv.cfg'),"
            " 'under_tmp': importlib.util.find_spec('under_tmp') is not None}\n"
        )
        server.deploy(fn_dir("tmpenv", code))
        resp = server.http.get("/fn/tmpenv")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"prefix": str(env), "cfg": True, "under_tmp": False}
        server.stop()


RAISES = """
import json

def handle(req, ctx):
    if req.path == "/lib":
        return json.loads("{not json")
    return helper()

def helper():
    raise ValueError("boom")
"""


def test_stack_traces_show_no_host_paths(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """Regression: stack traces returned to callers showed where Ember is installed."""
    server = server_factory()
    server.deploy(fn_dir("raises", RAISES))
    install = str(Path(__file__).resolve().parents[2])  # the checkout and its .venv
    for path in ("/", "/lib"):
        body = server.http.get(f"/fn/raises{path}").json()
        text = "".join(body["stackTrace"])
        assert install not in text and "/code/" not in text, text
        assert 'File "handler.py", line ' in text, text
        assert 'File "<ember>", line ' in text, text
    lib = "".join(server.http.get("/fn/raises/lib").json()["stackTrace"])
    assert 'File "json/decoder.py"' in lib, lib
    bad = server.cli("deploy", str(fn_dir("broken", "import nowhere_xyz\n")), check=False)
    assert bad.returncode == 3
    err = bad.stderr.decode()
    assert 'File "handler.py", line 1' in err and install not in err, err


def test_a_json_body_of_the_control_plane_is_capped(
    server_factory: Callable[..., EmberServer],
) -> None:
    """The API's JSON bodies were read whole, whatever their size."""
    server = server_factory()
    huge = b'{"name": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    resp = server.api.post(
        "/api/v1/keys", content=huge, headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413, resp.text[:200]
    assert resp.json()["error"]["code"] == "body_too_large"
    small = server.api.post("/api/v1/keys", json={"name": "ok", "scopes": ["read:default"]})
    assert small.status_code == 201, small.text
