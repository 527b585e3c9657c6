"""The HTTP front's limits, on top of uvicorn's httptools protocol.

* a request line and headers over `MAX_HEAD_BYTES` → 431 (httptools would buffer any size);
* one connection over `max_connections` → 503 and closed at once (each holds buffers and an fd);
* a head that has not arrived within `head_timeout` seconds of its first byte (or of the
  connection) → 408 and closed, within a second after: a slow-loris sender holds nothing for
  long. An idle keep-alive connection is uvicorn's to close (5 s).

This subclasses uvicorn's `HttpToolsProtocol` (not a public API); nothing else depends on it,
and it is the piece to replace if the HTTP front changes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; more is a 431


def bounded_protocol(max_connections: int, head_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""

    class Bounded(BoundedHead):
        pass

    Bounded.max_connections = max_connections
    Bounded.head_timeout = head_timeout
    return Bounded


class BoundedHead(HttpToolsProtocol):
    """Heads are timed by one sweep a second over the open connections, not by a timer per
    request: arming and cancelling a timer for each request cost ~4 % of warm throughput."""

    max_connections = 1024
    head_timeout = 10.0
    _sweeping = False  # per class (per server): one sweep at a time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head, self._in_head, self._tail = 0, True, b""
        self._head_since: float | None = self.loop.time()  # a new connection must send a head
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
        """408 for every head that has taken longer than `head_timeout` so far."""
        now = loop.time()
        for conn in list(connections):
            since = getattr(conn, "_head_since", None)
            if since is not None and now - since > cls.head_timeout:
                conn._head_timed_out()
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

    def on_headers_complete(self) -> None:
        self._in_head, self._head_since = False, None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head, self._in_head, self._tail = 0, True, b""  # the next request on the connection

    def data_received(self, data: bytes) -> None:
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
        super().data_received(data)

    def _answer(self, status: bytes, code: str, message: str, retry: bool = False) -> None:
        self._head_since = None
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        extra = b"retry-after: 1\r\n" if retry else b""
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close"
            b"\r\n" + extra + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.transport.close()
