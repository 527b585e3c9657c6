"""The floor of any design that answers HTTP in one process and runs the code in others.

Not a baseline (no user would run it) but a yardstick for the issue's goal of at least 1.0x a plain
Starlette app: the least a front process can do per request when the handler runs in another
process. One uvloop process parses HTTP with httptools (no routing, auth, limits or records)
and relays each request as one length-prefixed frame over a socketpair to one of `--workers`
forked processes, each answering the fixed JSON with a blocking loop. Everything Ember does
beyond that costs on top of this.

    python -m bench.relay_floor --port 8123 --workers 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
from collections import deque

import httptools

BODY = b'{"ok":true}'
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
LENGTH = struct.Struct("!I")


def worker(sock: socket.socket) -> None:
    """Read a frame (the request's URL), answer a frame (the body)."""
    pending = b""
    while data := sock.recv(65536):
        pending += data
        while len(pending) >= 4:
            (size,) = LENGTH.unpack_from(pending)
            if len(pending) < 4 + size:
                break
            pending = pending[4 + size :]
            sock.sendall(LENGTH.pack(len(BODY)) + BODY)
    os._exit(0)


class Worker(asyncio.Protocol):
    def __init__(self, idle: deque[Worker], waiting: deque[tuple[bytes, Client]]) -> None:
        self.idle, self.waiting = idle, waiting
        self.pending = b""
        self.client: Client | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.idle.append(self)

    def send(self, url: bytes, client: Client) -> None:
        self.client = client
        assert self.transport is not None
        self.transport.write(LENGTH.pack(len(url)) + url)

    def data_received(self, data: bytes) -> None:
        self.pending += data
        (size,) = LENGTH.unpack_from(self.pending)
        if len(self.pending) < 4 + size:
            return
        body, self.pending = self.pending[4 : 4 + size], self.pending[4 + size :]
        client, self.client = self.client, None
        assert client is not None
        client.answer(body)
        if self.waiting:
            url, nxt = self.waiting.popleft()
            self.send(url, nxt)
        else:
            self.idle.append(self)


class Client(asyncio.Protocol):
    def __init__(self, idle: deque[Worker], waiting: deque[tuple[bytes, Client]]) -> None:
        self.idle, self.waiting = idle, waiting
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        url, self.url = self.url, b""
        if self.idle:
            self.idle.popleft().send(url, self)
        else:
            self.waiting.append((url, self))

    def answer(self, body: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(HEAD % len(body) + body)


async def serve(port: int, workers: int) -> None:
    loop = asyncio.get_running_loop()
    idle: deque[Worker] = deque()
    waiting: deque[tuple[bytes, Client]] = deque()
    for _ in range(workers):
        ours, theirs = socket.socketpair()
        if os.fork() == 0:
            ours.close()
            worker(theirs)
        theirs.close()
        await loop.connect_accepted_socket(lambda: Worker(idle, waiting), ours)
    server = await loop.create_server(lambda: Client(idle, waiting), "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.workers))


if __name__ == "__main__":
    main()
