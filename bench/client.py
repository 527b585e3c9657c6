"""Load clients: one timed request on a kept-alive connection, and a burst over raw sockets."""

from __future__ import annotations

import http.client
import json
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timed:
    ms: float
    status: int
    tier: str
    body: bytes
    sent: float  # perf_counter() when the request was written (CLOCK_MONOTONIC on Linux)


class KeepAlive:
    """One persistent HTTP/1.1 connection; `get()` times request out → response read."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get(self, path: str) -> Timed:
        t0 = time.perf_counter()
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        body = resp.read()
        ms = (time.perf_counter() - t0) * 1000.0
        return Timed(ms, resp.status, resp.getheader("x-ember-start", ""), body, t0)

    def close(self) -> None:
        self.conn.close()


@dataclass
class _Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    done_at: float = 0.0
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _parse(conn: _Conn) -> bool:
    """True once `conn.buf` holds one whole response (Content-Length framed)."""
    end = conn.buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = conn.buf[:end].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
    length = int(headers.get("content-length", "0"))
    if len(conn.buf) < end + 4 + length:
        return False
    conn.status = int(head[0].split()[1])
    conn.headers = headers
    conn.body = bytes(conn.buf[end + 4 : end + 4 + length])
    del conn.buf[: end + 4 + length]
    return True


@dataclass
class BurstResult:
    sent_first: float  # time.time() when the first request was written
    sent_last: float
    responses: list[tuple[int, dict[str, str], Any, float]]  # status, headers, JSON, done at


class Burst:
    """N connections opened (and warmed on `warm_path`) beforehand; `fire()` writes one request
    on each as fast as the client can, then collects every response."""

    def __init__(self, port: int, n: int, warm_path: str = "/healthz") -> None:
        self.conns = [_Conn(socket.create_connection(("127.0.0.1", port))) for _ in range(n)]
        for c in self.conns:
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._roundtrip(warm_path)

    def _request(self, path: str) -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    def _roundtrip(self, path: str, timeout: float = 60.0) -> tuple[float, float]:
        data = self._request(path)
        first = time.time()
        for c in self.conns:
            c.sock.sendall(data)
        last = time.time()
        sel = selectors.DefaultSelector()
        for c in self.conns:
            sel.register(c.sock, selectors.EVENT_READ, c)
        pending = len(self.conns)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                c = key.data
                chunk = c.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed a burst connection")
                c.buf += chunk
                if _parse(c):
                    c.done_at = time.time()
                    sel.unregister(c.sock)
                    pending -= 1
        sel.close()
        if pending:
            raise TimeoutError(f"{pending} burst responses missing after {timeout:g} s")
        return first, last

    def fire(self, path: str) -> BurstResult:
        first, last = self._roundtrip(path)
        out = []
        for c in self.conns:
            try:
                payload = json.loads(c.body)
            except ValueError:
                payload = None
            out.append((c.status, c.headers, payload, c.done_at))
        return BurstResult(first, last, out)

    def close(self) -> None:
        for c in self.conns:
            c.sock.close()


@dataclass
class Load:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str


async def _load_loop(port: int, path: str, until: float, lat: list[float]) -> int:
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    errors = 0
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            lat.append((time.perf_counter() - t0) * 1000.0)
            errors += not head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return errors


def python_load(port: int, path: str, connections: int, seconds: float) -> Load:
    """The fallback load client when wrk is not installed (much slower than wrk)."""
    import asyncio

    from bench.common import percentile

    async def main() -> tuple[list[float], int]:
        lat: list[float] = []
        until = time.perf_counter() + seconds
        errs = await asyncio.gather(
            *(_load_loop(port, path, until, lat) for _ in range(connections))
        )
        return lat, sum(errs)

    lat, errors = asyncio.run(main())
    return Load(len(lat) / seconds, percentile(lat, 50), percentile(lat, 99), errors, "python")


@dataclass
class Overlap:
    first_byte_ms: float  # the slow request's time to its first byte (routing, render, write)
    last_byte_ms: float
    size: int  # bytes of its body
    status: int
    during_ms: list[float]  # fast requests sent one after another until that first byte came


def overlapped(port: int, slow_path: str, fast_path: str, auth: str = "") -> Overlap:
    """Send `slow_path` (with `auth` as its Authorization header, if any) on a connection of its
    own and, until its answer starts to arrive, time requests to `fast_path` one after another
    on a kept-alive connection: what a small request waits while the server works on the slow
    one."""
    fast = KeepAlive(port)
    slow = socket.create_connection(("127.0.0.1", port))
    extra = f"Authorization: {auth}\r\n" if auth else ""
    request = f"GET {slow_path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n"
    try:
        t0 = time.perf_counter()
        slow.sendall(request.encode())
        slow.setblocking(False)
        during: list[float] = []
        data = bytearray()
        while not data:
            try:
                chunk = slow.recv(1 << 20)
            except BlockingIOError:
                during.append(fast.get(fast_path).ms)
                continue
            if not chunk:
                raise ConnectionError(f"no answer to {slow_path}")
            data += chunk
        first = time.perf_counter()
        slow.setblocking(True)
        while chunk := slow.recv(1 << 20):  # Connection: close, so the body ends at EOF
            data += chunk
        last = time.perf_counter()
    finally:
        slow.close()
        fast.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    ms = 1000.0
    return Overlap((first - t0) * ms, (last - t0) * ms, len(body), status, during)
