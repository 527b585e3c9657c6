"""The HTTP front: uvicorn's httptools protocol with limits, and `/fn/` served without ASGI.

Requests under `/fn/` go from the parser's callbacks straight to the gateway's `Exchange`
(head → `open`, each body chunk → `feed`, end of message → one task that runs it and writes
the response bytes): no scope dict, no receive/send messages, no per-request Event. The
control plane (`/api/v1`, `/metrics`, `/healthz`) takes uvicorn's ASGI path unchanged, and so
do keep-alive, pipelining order, flow control and graceful shutdown (a `/fn/` request's task
is one of the server's tasks, and its cycle answers what uvicorn asks of one).

* a request line and headers over `MAX_HEAD_BYTES` → 431 (httptools would buffer any size);
* one connection over `max_connections` → 503 and closed at once (each holds buffers and an fd);
* a head that has not arrived within `head_timeout` seconds of its first byte (or of the
  connection) → 408 and closed, within a second after: a slow-loris sender holds nothing for
  long. An idle keep-alive connection is uvicorn's to close (5 s).

This subclasses uvicorn's `HttpToolsProtocol` (not a public API: pyproject pins uvicorn's
minor version); nothing else depends on it, and it is the piece to replace if the HTTP front
changes. Limits:
"""

from __future__ import annotations

import asyncio
import functools
import http
import json
import urllib.parse
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ember.gateway.app import ASYNC_PREFIXES, Exchange, Gateway, Response
from ember.gateway.rules import PREFIX

PREFIXES = (PREFIX, *ASYNC_PREFIXES)  # served by the gateway, not by ASGI

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; more is a 431


@functools.cache
def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


def front_protocol(
    gateway: Gateway, max_connections: int, head_timeout: float
) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""

    class Bounded(Front):
        pass

    Bounded.gateway = gateway
    Bounded.max_connections = max_connections
    Bounded.head_timeout = head_timeout
    return Bounded


class FunctionCycle:
    """A `/fn/` request as uvicorn's protocol sees a cycle (`response_complete`, `keep_alive`,
    `disconnected`, `message_event.set()`), driving the gateway's `Exchange`."""

    __slots__ = (
        "disconnected",
        "exchange",
        "first",
        "head_only",
        "keep_alive",
        "response_complete",
        "running",
        "whole",
    )

    def __init__(self, exchange: Exchange, keep_alive: bool, head_only: bool) -> None:
        self.exchange = exchange
        self.keep_alive = keep_alive
        self.head_only = head_only  # HEAD: the response's head alone
        self.disconnected = False
        self.response_complete = False
        self.first = False  # first in line on its connection (pipelined requests wait)
        self.whole = False  # the body has arrived
        self.running = False

    @property
    def message_event(self) -> FunctionCycle:
        return self  # uvicorn sets it when the connection is lost; nothing here waits on it

    def set(self) -> None:
        pass


class Front(HttpToolsProtocol):
    """Heads and idle keep-alive connections are timed by one sweep a second over the open
    connections, not by a timer per request: arming and cancelling a timer for each request
    cost ~4 % of warm throughput."""

    gateway: Gateway
    max_connections = 1024
    head_timeout = 10.0
    _sweeping = False  # per class (per server): one sweep at a time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head, self._in_head, self._tail = 0, True, b""
        self._head_since: float | None = self.loop.time()  # a new connection must send a head
        self._idle_since: float | None = None  # answered everything, nothing new has come
        if len(self.connections) > self.max_connections:
            self._answer(
                b"503 Service Unavailable",
                "too_many_connections",
                f"the server has {self.max_connections} connections open, its limit "
                "(ember up --max-connections); retry later",
                retry=True,
            )
            return
        if not type(self)._sweeping:
            type(self)._sweeping = True
            self.loop.call_later(1.0, self._sweep, self.loop, self.connections)

    @classmethod
    def _sweep(cls, loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
        """408 for every head that has taken longer than `head_timeout` so far; close the
        keep-alive connections idle for longer than uvicorn's `timeout_keep_alive`."""
        now = loop.time()
        for conn in list(connections):
            since = getattr(conn, "_head_since", None)
            if since is not None and now - since > cls.head_timeout:
                conn._head_timed_out()
            idle = getattr(conn, "_idle_since", None)
            if idle is not None and now - idle > conn.timeout_keep_alive:
                conn._idle_since = None
                conn.timeout_keep_alive_handler()
        if connections:
            loop.call_later(1.0, cls._sweep, loop, connections)
        else:
            cls._sweeping = False

    def _head_timed_out(self) -> None:
        self._answer(
            b"408 Request Timeout",
            "head_timeout",
            f"the request line and headers did not arrive within {self.head_timeout:g} s",
        )

    # ---- the parser's callbacks: /fn/ to the gateway, the rest to uvicorn's ASGI cycle ----
    def on_message_begin(self) -> None:
        """uvicorn's, without the ASGI scope: only a request that takes the ASGI path gets one
        (`_asgi_scope`)."""
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def _asgi_scope(self) -> None:
        """The scope uvicorn's `on_message_begin` makes; its `on_headers_complete` fills it."""
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }

    def on_headers_complete(self) -> None:
        self._in_head, self._head_since = False, None
        url = httptools.parse_url(self.url)
        path = url.path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        if not path.startswith(PREFIXES) or self.parser.should_upgrade():
            self._asgi_scope()
            super().on_headers_complete()
            return
        parser = self.parser
        method = parser.get_method().decode("ascii")
        keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
        exchange = self.gateway.open(method, path, url.path, url.query or b"", self.headers)
        cycle = FunctionCycle(exchange, keep_alive, method == "HEAD")
        previous, self.cycle = self.cycle, cycle  # type: ignore[assignment]
        if previous is None or previous.response_complete:
            cycle.first = True
            if self.expect_100_continue and exchange.response is None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._advance(cycle)
        else:  # pipelined behind a request still being answered
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, None))  # type: ignore[arg-type]

    def on_body(self, body: bytes) -> None:
        cycle: RequestResponseCycle | FunctionCycle = self.cycle
        if type(cycle) is not FunctionCycle:
            super().on_body(body)
        elif not cycle.response_complete:
            cycle.exchange.feed(body)
            if cycle.exchange.response is not None:  # 413 or 503: answer at once
                self._advance(cycle)

    def on_message_complete(self) -> None:
        cycle: RequestResponseCycle | FunctionCycle = self.cycle
        if type(cycle) is not FunctionCycle:
            super().on_message_complete()
        else:
            cycle.whole = True
            self._advance(cycle)
        self._head, self._in_head, self._tail = 0, True, b""  # the next request on the connection

    def _start_asgi_task(self, cycle: RequestResponseCycle | FunctionCycle, app: Any) -> None:
        """uvicorn starts the next pipelined request here once the one before it answered."""
        if isinstance(cycle, RequestResponseCycle):
            super()._start_asgi_task(cycle, app)
            return
        cycle.first = True
        self._advance(cycle)

    def connection_lost(self, exc: Exception | None) -> None:
        waiting: list[RequestResponseCycle | FunctionCycle | None] = [self.cycle]
        waiting += (cycle for cycle, _ in self.pipeline)
        super().connection_lost(exc)
        for cycle in waiting:  # give back the bodies of requests that will never run
            if type(cycle) is FunctionCycle and not cycle.running:
                cycle.exchange.close()

    # ---- /fn/ requests ----
    def _advance(self, cycle: FunctionCycle) -> None:
        """Answer a refusal, or run the exchange once its body is whole, if it is its turn."""
        if not cycle.first or cycle.running or cycle.response_complete:
            return
        if cycle.exchange.response is not None:
            self._write(cycle, cycle.exchange.response)
        elif cycle.whole:
            cycle.running = True
            cycle.exchange.start(functools.partial(self._write, cycle))

    def _write(self, cycle: FunctionCycle, response: Response) -> None:
        cycle.response_complete = True
        if cycle.disconnected:
            return
        status, headers, body = response
        out = [_status_line(status)]
        for name, value in (*self.server_state.default_headers, *headers):
            out += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            out.append(b"connection: close\r\n")
        out += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n")
        if not cycle.head_only:
            out.append(body)
        self.transport.write(b"".join(out))
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def on_response_complete(self) -> None:
        """uvicorn's, except that an idle connection is left to the sweep (no timer)."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()

    def data_received(self, data: bytes) -> None:
        self._idle_since = None
        if self._in_head:  # count up to the blank line that ends the head, not the body
            if self._head_since is None:  # the next request's first bytes: its head's clock
                self._head_since = self.loop.time()
            seen = self._tail + data  # the blank line may straddle two reads
            end = seen.find(b"\r\n\r\n")
            self._head += len(data) if end < 0 else max(0, end - len(self._tail))
            self._tail = seen[-3:]
            if self._head > MAX_HEAD_BYTES:
                self._answer(
                    b"431 Request Header Fields Too Large",
                    "headers_too_large",
                    f"the request line and headers exceed {MAX_HEAD_BYTES // 1024} KB; send "
                    "large values in the body",
                )
                return
        try:  # uvicorn's, without its keep-alive timer (the sweep closes idle connections)
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _answer(self, status: bytes, code: str, message: str, retry: bool = False) -> None:
        self._head_since = None
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        extra = b"retry-after: 1\r\n" if retry else b""
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close"
            b"\r\n" + extra + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()
