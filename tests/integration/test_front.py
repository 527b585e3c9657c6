"""The HTTP front's own path for /fn/ (server/http.py): what uvicorn's ASGI cycle did for the
gateway before, it must still do: pipelined requests answered in order, HEAD, HTTP/1.0,
idle keep-alive connections closed, bodies of vanished clients given back."""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.integration.conftest import GATED, EmberServer, Gate, wait_for

ECHO = (
    GATED
    + """
def handle(req, ctx):
    gate(req)
    return {"path": req.path, "got": len(req.body)}
"""
)
GET = b"GET /fn/echo HTTP/1.1\r\nHost: x\r\n\r\n"
CONCURRENT = "functions:\n  echo:\n    concurrency: 4\n"


def _read_response(sock: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """(head, body, what was read past it) of one response with a content-length."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-head: {data[:300]!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return head, rest[:length], rest[length:]


def test_pipelined_requests_are_answered_in_order_even_when_the_first_is_slower(
    server: EmberServer, fn_dir: Callable[..., Path]
) -> None:
    server.deploy(fn_dir("echo", ECHO, CONCURRENT))
    with Gate() as gate, socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(
            f"GET /fn/echo/first?gate={gate.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            + b"POST /fn/echo/second HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        )
        gate.wait(1, "the first request, held in the function")
        gate.open()
        head1, body1, rest = _read_response(s)
        head2, body2, _ = _read_response(s, rest)
    assert head1.startswith(b"HTTP/1.1 200 ") and httpx.Response(200, content=body1).json() == {
        "path": "/first",
        "got": 0,
    }
    assert head2.startswith(b"HTTP/1.1 200 ") and httpx.Response(200, content=body2).json() == {
        "path": "/second",
        "got": 3,
    }


def test_head_gets_the_head_alone_and_http_1_0_is_closed_after_its_answer(
    server: EmberServer, fn_dir: Callable[..., Path]
) -> None:
    server.deploy(fn_dir("echo", ECHO, CONCURRENT))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"HEAD /fn/echo HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
        data = b""
        while data.count(b"HTTP/1.1 200 ") < 2 or not data.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    head, _, after = data.partition(b"\r\n\r\n")
    # {"path":"/","got":0}
    assert b"content-length: 20" in head.lower() and b"x-ember-request-id" in head.lower()
    assert after.startswith(b"HTTP/1.1 200 "), after[:200]  # no body between the two heads
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /fn/echo HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):  # ends: the server closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ") and b"connection: close" in answer.lower()


def test_an_idle_keep_alive_connection_is_closed_by_the_server(
    server: EmberServer, fn_dir: Callable[..., Path]
) -> None:
    server.deploy(fn_dir("echo", ECHO, CONCURRENT))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /fn/echo HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, rest = _read_response(s)
        assert head.startswith(b"HTTP/1.1 200 ") and not rest
        assert s.recv(65536) == b""  # uvicorn's keep-alive timeout (5 s), within the 30 s


def test_the_body_of_a_client_that_went_away_is_given_back_to_the_budget(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """A request whose client vanished mid-body held its bytes in the server's budget of
    request bodies until the server restarted."""
    server = server_factory("--max-buffered-mb", "8")
    server.deploy(fn_dir("echo", ECHO))
    part = b"x" * (5 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /fn/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6000000\r\n\r\n" + part)
        with httpx.Client(base_url=server.url, timeout=30) as client:  # 5 + 5 MB > 8 MB
            wait_for(
                lambda: client.post("/fn/echo", content=part).status_code == 503,
                30,
                "the first body to be held",
            )
    # the first client is gone, its 5 MB must come back
    wait_for(
        lambda: httpx.post(f"{server.url}/fn/echo", content=part, timeout=30).status_code == 200,
        30,
        "a 5 MB body to be accepted again",
    )
    with Gate() as gate, ThreadPoolExecutor(1) as pool:  # and it still counts what it holds
        held = pool.submit(httpx.post, f"{server.url}/fn/echo?gate={gate.port}", content=part)
        gate.wait(1)
        assert httpx.post(f"{server.url}/fn/echo", content=part, timeout=30).status_code == 503
        gate.open()
        assert held.result().status_code == 200
