"""Deploy and invoke over HTTP: exact requests, return conversions, start tiers, errors."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import EmberServer

ECHO = """
import base64, os
import ember

FORKED = []

@ember.on_fork
def mark():
    FORKED.append(os.getpid())

def handle(req, ctx):
    return {
        "method": req.method,
        "path": req.path,
        "raw_path": req.raw_path,
        "query": {k: req.query.getall(k) for k in req.query},
        "headers": req.headers.items_all(),
        "x_custom": req.headers.get("X-CUSTOM"),
        "body": base64.b64encode(req.body).decode(),
        "request_id": ctx.request_id,
        "function": ctx.function,
        "revision": ctx.revision,
        "memory_mb": ctx.memory_mb,
        "remaining_ms": ctx.remaining_ms(),
        "pid": os.getpid(),
        "forked": FORKED,
    }
"""


def test_hello_first_request_forks_then_warm(server: EmberServer, fn_dir: Callable[..., Path]):
    server.deploy(
        fn_dir(
            "hello", "def handle(req, ctx):\n    return {'hello': req.query.get('name', 'world')}\n"
        )
    )
    first = server.http.get("/fn/hello", params={"name": "ada"})
    assert first.status_code == 200
    assert first.json() == {"hello": "ada"}
    assert first.headers["x-ember-start"] == "fork"  # the deploy left the zygote warm
    assert first.headers["x-ember-revision"] == "1"
    assert len(first.headers["x-ember-request-id"]) == 32
    second = server.http.get("/fn/hello")
    assert second.json() == {"hello": "world"}
    assert second.headers["x-ember-start"] == "warm"


def test_request_reaches_the_function_byte_exact(server: EmberServer, fn_dir: Callable[..., Path]):
    server.deploy(fn_dir("echo", ECHO))
    body = bytes(range(256)) * 40
    resp = server.http.put(
        "/fn/echo/ünï/cødé/a%2Fb",
        params=[("a", "1"), ("a", "2"), ("b", "")],
        content=body,
        headers={"X-Custom": "Value", "Content-Type": "application/x-bin"},
    )
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["method"] == "PUT"
    assert got["path"] == "/ünï/cødé/a/b", "percent-decoded"
    assert got["raw_path"] == "/%C3%BCn%C3%AF/c%C3%B8d%C3%A9/a%2Fb", "exactly as sent"
    assert got["query"] == {"a": ["1", "2"], "b": [""]}
    assert got["x_custom"] == "Value"
    assert ["content-type", "application/x-bin"] in got["headers"]
    assert base64.b64decode(got["body"]) == body
    assert got["request_id"] == resp.headers["x-ember-request-id"]
    assert got["function"] == "echo" and got["revision"] == 1 and got["memory_mb"] == 128
    assert 0 < got["remaining_ms"] <= 30_000
    assert got["forked"] == [got["pid"]], "on_fork hooks run once, in the instance itself"
    server.deploy(fn_dir("echo", ECHO), "--namespace", "team-raw")
    for sent, path, raw_path in [
        ("/fn/echo", "/", "/"),
        ("/fn/echo/", "/", "/"),
        ("/fn/echo@latest/%7Ex//y%20", "/~x//y ", "/%7Ex//y%20"),
        ("/fn/team-raw/echo/a%2Fb", "/a/b", "/a%2Fb"),
    ]:
        seen = server.http.get(sent).json()
        assert (seen["path"], seen["raw_path"]) == (path, raw_path), sent


RETURNS = """
import ember

def handle(req, ctx):
    kind = req.query.get("kind")
    if kind == "text":
        return "héllo"
    if kind == "bytes":
        return b"\\x00\\xff"
    if kind == "tuple":
        return {"created": True}, 201, {"X-Thing": "1"}
    if kind == "response":
        return ember.Response("<b>hi</b>", status=202, content_type="text/html")
    if kind == "none":
        return None
    if kind == "list":
        return [1, 2, 3]
    if kind == "bad":
        return object()
    raise ValueError("no kind " + repr(kind))
"""


def test_return_values_become_responses(server: EmberServer, fn_dir: Callable[..., Path]):
    server.deploy(fn_dir("returns", RETURNS))
    get = lambda kind: server.http.get("/fn/returns", params={"kind": kind})  # noqa: E731
    text = get("text")
    assert (text.status_code, text.text) == (200, "héllo")
    assert text.headers["content-type"] == "text/plain; charset=utf-8"
    raw = get("bytes")
    assert raw.content == b"\x00\xff"
    assert raw.headers["content-type"] == "application/octet-stream"
    tup = get("tuple")
    assert (tup.status_code, tup.json(), tup.headers["x-thing"]) == (201, {"created": True}, "1")
    resp = get("response")
    assert (resp.status_code, resp.text) == (202, "<b>hi</b>")
    assert resp.headers["content-type"] == "text/html"
    assert get("none").status_code == 204
    assert get("list").json() == [1, 2, 3]
    bad = get("bad")
    assert bad.status_code == 500
    assert bad.json()["errorType"] == "BadReturn"


def test_exception_becomes_500_with_stack_trace(server: EmberServer, fn_dir: Callable[..., Path]):
    server.deploy(fn_dir("returns", RETURNS))
    resp = server.http.get("/fn/returns", params={"kind": "boom"})
    assert resp.status_code == 500
    err = resp.json()
    assert err["errorType"] == "ValueError"
    assert err["errorMessage"] == "no kind 'boom'"
    assert any("handler.py" in line for line in err["stackTrace"])
    assert err["requestId"] == resp.headers["x-ember-request-id"]
    again = server.http.get("/fn/returns", params={"kind": "text"})
    assert again.status_code == 200 and again.headers["x-ember-start"] == "warm"


def test_unknown_function_is_404_json(server: EmberServer):
    resp = server.http.get("/fn/nope/x")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"
    assert "nope" in resp.json()["error"]["message"]


def test_async_handler_serves_concurrent_requests_in_one_instance(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    code = """
    import asyncio, os
    ALL_IN = asyncio.Barrier(6)  # passed only when the six requests run at once
    async def handle(req, ctx):
        async with asyncio.timeout(20):
            await ALL_IN.wait()
        return {"pid": os.getpid()}
    """
    manifest = """
    functions:
      aio:
        concurrency: 8
        scale: {max: 1}
    """
    server.deploy(fn_dir("aio", code, manifest))
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: server.http.get("/fn/aio"), range(6)))
    assert [r.status_code for r in results] == [200] * 6, results[0].text
    assert len({r.json()["pid"] for r in results}) == 1


def test_large_response_and_large_output(server: EmberServer, fn_dir: Callable[..., Path]):
    code = """
    import sys
    def handle(req, ctx):
        if req.query.get("print"):
            chunk = "x" * 1023 + "\\n"
            for _ in range(10 * 1024):
                sys.stdout.write(chunk)
            return "printed"
        return b"z" * (20 * 1024 * 1024)
    """
    server.deploy(fn_dir("big", code))
    body = server.http.get("/fn/big")
    assert body.status_code == 200
    assert len(body.content) == 20 * 1024 * 1024 and body.content.count(b"z") == len(body.content)
    printed = server.http.get("/fn/big", params={"print": "1"})
    assert printed.status_code == 200 and printed.text == "printed"
    rid = printed.headers["x-ember-request-id"]
    lines = _logs(server, "big", lambda rows: any("dropped" in r["message"] for r in rows))
    mine = [r for r in lines if r["request_id"] == rid]
    assert sum(len(r["message"]) for r in mine if r["stream"] == "stdout") == 1024 * 1024
    assert any("bytes of output dropped" in r["message"] for r in mine)
    assert server.http.get("/healthz").status_code == 200


def _logs(
    server: EmberServer, name: str, done: Callable[[list[dict[str, object]]], bool]
) -> list[dict[str, object]]:
    from tests.integration.conftest import wait_for

    rows: list[dict[str, object]] = []

    def fetch() -> bool:
        nonlocal rows
        resp = server.api.get(f"/api/v1/functions/{name}/logs", params={"limit": 100000})
        rows = [json.loads(line) for line in resp.text.splitlines()]
        return done(rows)

    wait_for(fetch, 10, f"logs of {name}")
    return rows


def test_async_output_and_threaded_sync_handlers(server: EmberServer, fn_dir: Callable[..., Path]):
    chatty_async = """
    import sys
    async def handle(req, ctx):
        for _ in range(300):
            sys.stdout.write("y" * 4095 + "\\n")  # 1.2 MB through a non-blocking socket
        return "done"
    """
    server.deploy(fn_dir("loud-async", chatty_async))
    resp = server.http.get("/fn/loud-async")
    assert resp.status_code == 200 and resp.text == "done"
    threaded = """
    import os, threading
    ALL_IN = threading.Barrier(4, timeout=20)  # passed only when the four run at once
    def handle(req, ctx):
        ALL_IN.wait()
        return {"pid": os.getpid(), "thread": threading.get_ident()}
    """
    manifest = "functions:\n  threaded:\n    concurrency: 4\n    scale: {max: 1}\n"
    server.deploy(fn_dir("threaded", threaded, manifest))
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: server.http.get("/fn/threaded"), range(4)))
    assert [r.status_code for r in responses] == [200] * 4, responses[0].text
    results = [r.json() for r in responses]
    assert len({r["pid"] for r in results}) == 1, "one instance"
    assert len({r["thread"] for r in results}) == 4, "served by its worker threads at once"
