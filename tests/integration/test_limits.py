"""Every limit ends the invocation with a clear JSON error and leaves the server serving."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import EmberServer

LIMITS = """
import os, time

HOG = []

def handle(req, ctx):
    what = req.query.get("do")
    if what == "sleep":
        time.sleep(float(req.query.get("s", "5")))
    elif what == "hog":
        while True:
            HOG.append(bytearray(8 * 1024 * 1024))
    elif what == "exit":
        os._exit(3)
    elif what == "abort":
        os.abort()
    return {"pid": os.getpid()}
"""

MANIFEST = """
functions:
  limits:
    timeout: 1s
    memory: 64
"""


def _deploy(server: EmberServer, fn_dir: Callable[..., Path]) -> None:
    server.deploy(fn_dir("limits", LIMITS, MANIFEST))


def test_timeout_kills_the_instance_with_504(server: EmberServer, fn_dir: Callable[..., Path]):
    _deploy(server, fn_dir)
    before = server.http.get("/fn/limits").json()["pid"]
    resp = server.http.get("/fn/limits", params={"do": "sleep", "s": "10"})
    assert resp.status_code == 504
    err = resp.json()["error"]
    assert err["code"] == "timeout"
    assert "timed out after 1 s" in err["message"] and "timeout:" in err["message"]
    after = server.http.get("/fn/limits")
    assert after.status_code == 200
    assert after.json()["pid"] != before


def test_memory_limit_kills_with_502_naming_the_limit(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    _deploy(server, fn_dir)
    resp = server.http.get("/fn/limits", params={"do": "hog"})
    assert resp.status_code == 502, resp.text
    err = resp.json()["error"]
    assert err["code"] == "memory_limit"
    assert "memory limit of 64 MB" in err["message"]
    assert server.http.get("/fn/limits").status_code == 200


def test_crash_is_502_and_next_request_gets_a_new_instance(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    _deploy(server, fn_dir)
    first = server.http.get("/fn/limits").json()["pid"]
    for action, words in (("exit", "exited with code 3"), ("abort", "killed by SIGABRT")):
        resp = server.http.get("/fn/limits", params={"do": action})
        assert resp.status_code == 502
        assert resp.json()["error"]["code"] == "crashed"
        assert words in resp.json()["error"]["message"]
    nxt = server.http.get("/fn/limits")
    assert nxt.status_code == 200
    # A new instance either way: forked for this request, or started by the autoscaler (which
    # holds the recent demand of one) if its tick came between the crash and this request.
    assert nxt.json()["pid"] != first


def test_request_body_over_6_mb_is_413(server: EmberServer, fn_dir: Callable[..., Path]):
    _deploy(server, fn_dir)
    resp = server.http.post("/fn/limits", content=b"x" * (6 * 1024 * 1024 + 1))
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "body_too_large"

    def chunks():  # no content-length: counted while streaming
        for _ in range(7):
            yield b"y" * (1024 * 1024)

    streamed = server.http.post("/fn/limits", content=chunks())
    assert streamed.status_code == 413
    ok = server.http.post("/fn/limits", content=b"x" * (6 * 1024 * 1024))
    assert ok.status_code == 200


def test_scale_max_queues_excess_requests(server: EmberServer, fn_dir: Callable[..., Path]):
    code = """
    import os, time
    def handle(req, ctx):
        time.sleep(0.2)
        return {"pid": os.getpid()}
    """
    server.deploy(fn_dir("capped", code, "functions:\n  capped:\n    scale: {max: 2}\n"))
    with cf.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: server.http.get("/fn/capped"), range(10)))
    assert [r.status_code for r in results] == [200] * 10
    assert len({r.json()["pid"] for r in results}) <= 2


def test_queue_overflow_is_429_with_retry_after(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    server = server_factory("--queue-depth", "1")
    code = """
    import time
    def handle(req, ctx):
        time.sleep(0.5)
        return "ok"
    """
    server.deploy(fn_dir("tiny", code, "functions:\n  tiny:\n    scale: {max: 1}\n"))
    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: server.http.get("/fn/tiny"), range(6)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) >= 2 and 429 in codes
    rejected = next(r for r in results if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert "scale.max=1" in rejected.json()["error"]["message"]
