"""The server's end of a zygote control channel: SOCK_SEQPACKET, msgpack, fds by SCM_RIGHTS."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")
MAX_PACKET = 256 * 1024


class AsyncChannel(Generic[T]):
    """Sends commands (optionally with one fd) and dispatches incoming messages to `on_message`.

    `on_close` runs once when the peer goes away.
    """

    def __init__(
        self,
        sock: socket.socket,
        incoming: Any,
        on_message: Callable[[T], None],
        on_close: Callable[[], None],
    ) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(incoming)
        self._on_message = on_message
        self._on_close = on_close
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, msg: msgspec.Struct, fd: int | None = None) -> None:
        """Send now; control messages are small, so the socket buffer never fills in practice."""
        if self.closed:
            raise ConnectionError("channel closed")
        data = self._encoder.encode(msg)
        self.sock.setblocking(True)
        try:
            if fd is None:
                self.sock.send(data)
            else:
                socket.send_fds(self.sock, [data], [fd])
        finally:
            self.sock.setblocking(False)

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            self._on_message(self._decoder.decode(data))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self._on_close()
