"""Many HTTP requests fast: N kept-alive connections on one asyncio loop (uvloop when there),
each sending its next request when the previous one is answered. Used to queue async
invocations by the thousand (bench/async_invoke.py, tests/integration/test_async.py)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass
class Produced:
    statuses: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)  # perf_counter() at each write
    answered: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0  # connections that ended in an error (the server went away)

    @property
    def rate(self) -> float:
        return len(self.statuses) / self.seconds if self.seconds else 0.0


def request(
    method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _connection(
    port: int, work: Iterator[tuple[bytes, float]], out: Produced, clock: float
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for data, at in work:
            if at:  # an open-loop schedule: not before its time
                delay = clock + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent = time.perf_counter()
            writer.write(data)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            out.statuses.append(status)
            out.bodies.append(body)
            out.sent.append(sent)
            out.answered.append(time.perf_counter())
    finally:
        writer.close()


async def produce_async(
    port: int,
    requests: Sequence[bytes],
    connections: int = 32,
    rate: float = 0.0,
    out: Produced | None = None,
) -> Produced:
    """Send every request once over `connections` connections; with `rate` > 0, request i is
    sent no earlier than i / rate seconds after the start (open loop, as far as the
    connections keep up). A connection the server drops ends; `out` has what was answered
    (`errors` counts the dropped connections)."""
    out = out if out is not None else Produced()
    at = (i / rate for i in itertools.count()) if rate > 0 else itertools.repeat(0.0)
    work = zip(requests, at, strict=False)
    clock = time.perf_counter()
    done = await asyncio.gather(
        *(_connection(port, work, out, clock) for _ in range(min(connections, len(requests)))),
        return_exceptions=True,
    )
    out.errors = sum(1 for d in done if isinstance(d, BaseException))
    out.seconds = time.perf_counter() - clock
    return out


def produce(
    port: int,
    requests: Sequence[bytes],
    connections: int = 32,
    rate: float = 0.0,
    out: Produced | None = None,
) -> Produced:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(produce_async(port, requests, connections, rate, out))
    return uvloop.run(produce_async(port, requests, connections, rate, out))
