"""Misbehaving functions and hostile input: each gets a clear error, the server stays up."""

from __future__ import annotations

import concurrent.futures as cf
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import EmberServer, alive, named, wait_for


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


HELLO = b"def handle(req, ctx):\n    return 'hi'\n"


def test_yaml_alias_bomb_is_refused_and_the_server_keeps_serving(server: EmberServer):
    server.api.post("/api/v1/deploy", params={"name": "up"}, content=_tar({"handler.py": HELLO}))
    # 8 levels of 10 aliases each: a few hundred bytes that repr() would expand to 10^8 items
    levels = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join(f'*a{i - 1}' for _ in range(10))}]" for i in range(1, 8)]
    bomb = f"functions:\n  up:\n    memory: [{', '.join(levels)}]\n"
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            server.api.post,
            "/api/v1/deploy",
            params={"name": "up"},
            content=_tar({"handler.py": HELLO, "ember.yaml": bomb.encode()}),
        )
        assert server.http.get("/fn/up").text == "hi"
        resp = pending.result()
    assert resp.status_code == 400 and len(resp.content) < 10_000, "refused, never expanded"
    assert resp.json()["error"]["code"] == "bad_manifest", resp.text


def test_deep_or_long_paths_are_refused(server: EmberServer):
    deep = "/".join(["d"] * 3000) + "/x.py"
    for name in (deep, "a" * 300 + ".py"):
        resp = server.api.post(
            "/api/v1/deploy",
            params={"name": "deep"},
            content=_tar({"handler.py": HELLO, name: b"x"}),
        )
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "bad_bundle"
    leftovers = [p for p in (server.home / "code").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_function_cannot_forge_framing_or_ember_headers(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    code = """
    import ember

    def handle(req, ctx):
        if req.query.get("crlf"):
            return "x", 200, {"X-Bad": "a\\r\\nInjected: yes"}
        if req.query.get("nocontent"):
            return "ignored body", 204
        if req.query.get("ctype"):
            return ember.Response("x", content_type="text/html\\r\\nSet-Cookie: a=1")
        return "ok", 200, {"Transfer-Encoding": "chunked", "X-Ember-Revision": "999",
                           "Connection": "close", "X-Fine": "1"}
    """
    server.deploy(fn_dir("forger", code))
    resp = server.http.get("/fn/forger")
    assert resp.status_code == 200 and resp.text == "ok"
    assert resp.headers["x-ember-revision"] == "1" and resp.headers["x-fine"] == "1"
    assert "transfer-encoding" not in resp.headers
    empty = server.http.get("/fn/forger", params={"nocontent": "1"})
    assert empty.status_code == 204 and empty.content == b""
    for query in ({"crlf": "1"}, {"ctype": "1"}):
        forged = server.http.get("/fn/forger", params=query)
        assert forged.status_code == 500 and forged.json()["errorType"] == "BadReturn"
        assert "set-cookie" not in forged.headers
    bad = server.http.get("/fn/forger", params={"crlf": "1"})
    assert bad.status_code == 500 and bad.json()["errorType"] == "BadReturn"
    assert "injected" not in bad.headers
    assert server.http.get("/fn/forger").status_code == 200


def test_hanging_import_is_rejected_at_the_init_timeout(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    server = server_factory("--init-timeout", "1")
    server.deploy(fn_dir("other", "def handle(req, ctx):\n    return 'other'\n"))
    slow = fn_dir("slow-init", "import time\ntime.sleep(3600)\ndef handle(req, ctx):\n    pass\n")
    out = server.cli("deploy", str(slow), check=False)
    assert out.returncode == 3 and b"InitTimeout: the module did not finish importing" in out.stderr
    again = server.cli("deploy", str(fn_dir("other2", "def handle(req, ctx):\n    return 2\n")))
    assert again.returncode == 0, "the deploy lock was released"
    assert server.http.get("/fn/other").text == "other"


def test_init_failure_after_restart_is_502_for_everyone_and_others_still_serve(
    server_factory: Callable[..., EmberServer],
    fn_dir: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    # The sandbox hides the host's files; TZ is one of the variables the server passes on.
    code = """
    import os
    if os.environ.get("TZ") == "Etc/Broken":
        raise RuntimeError("the config file it needs is gone")
    def handle(req, ctx):
        return "fine"
    """
    home = tmp_path / "home"
    first = server_factory(home=home)
    first.deploy(
        fn_dir(
            "fragile",
            code,
            "functions:\n  fragile:\n    scale: {min: 1, max: 1}\n    timeout: 20s\n",
        )
    )
    first.deploy(fn_dir("sturdy", "def handle(req, ctx):\n    return 'sturdy'\n"))
    assert first.stop() == 0
    monkeypatch.setenv("TZ", "Etc/Broken")
    second = server_factory(home=home)  # scale.min > 0 must not stop the server from starting
    with cf.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: second.http.get("/fn/fragile"), range(3)))
    for resp in results:
        assert resp.status_code == 502, resp.text
        assert resp.json()["error"]["code"] == "init_failed"
        assert "config file it needs is gone" in resp.json()["error"]["message"]
    assert second.http.get("/fn/sturdy").text == "sturdy"


STUBBORN = """
import ctypes, time
ctypes.CDLL(None).prctl(15, b"ember-stubborn", 0, 0, 0)  # PR_SET_NAME: the test looks for it
while True:
    try:
        time.sleep(100)
    except Exception:
        pass
"""


def test_a_hung_import_that_swallows_the_timeout_is_still_ended(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    server = server_factory("--init-timeout", "0.5")
    stubborn = fn_dir("stubborn", STUBBORN)
    with cf.ThreadPoolExecutor(1) as pool:
        deploying = pool.submit(server.cli, "deploy", str(stubborn), check=False)
        wait_for(lambda: named("ember-stubborn") != [], 30, "the hung import to be running")
        zygote = named("ember-stubborn")
        assert len(zygote) == 1, zygote
        keeper = zygote[0].parent()  # outside its pid namespace, if sandboxed
        assert keeper is not None
        hung = zygote if "ember.runtime.root" in " ".join(keeper.cmdline()) else [*zygote, keeper]
        out = deploying.result()
    assert out.returncode == 3 and b"did not finish importing" in out.stderr, out.stderr
    wait_for(lambda: not any(alive(p) for p in hung), 10, "the hung zygote to be killed")
    assert named("ember-stubborn") == []


def test_scale_max_holds_for_a_burst_from_zero(server: EmberServer, fn_dir: Callable[..., Path]):
    code = """
    import os, time
    def handle(req, ctx):
        time.sleep(0.2)
        return {"pid": os.getpid()}
    """
    server.deploy(fn_dir("one-only", code, "functions:\n  one-only:\n    scale: {max: 1}\n"))
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: server.http.get("/fn/one-only"), range(16)))
    assert all(r.status_code == 200 for r in results)
    assert len({r.json()["pid"] for r in results}) == 1


def test_network_none_cannot_reach_the_host(server: EmberServer, fn_dir: Callable[..., Path]):
    code = """
    import socket
    def handle(req, ctx):
        port = int(req.query.get("port"))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return {"reached": True}
        except OSError as exc:
            return {"reached": False, "error": type(exc).__name__}
    """
    server.deploy(fn_dir("sealed", code, "functions:\n  sealed:\n    network: none\n"))
    server.deploy(fn_dir("open", code))
    port = str(server.port)  # the Ember server itself listens on 127.0.0.1 of the host
    assert server.http.get("/fn/open", params={"port": port}).json() == {"reached": True}
    sealed = server.http.get("/fn/sealed", params={"port": port}).json()
    assert sealed == {"reached": False, "error": "ConnectionRefusedError"}
    described = server.cli("describe", "sealed").stdout.decode()
    assert "network" in described and "none" in described
