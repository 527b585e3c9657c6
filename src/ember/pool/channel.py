"""The server's end of a zygote control channel: SOCK_SEQPACKET, msgpack, fds by SCM_RIGHTS."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

from ember.errors import PlatformError
from ember.wire.messages import MAX_CONTROL_PACKET

T = TypeVar("T")
BATCH = 64  # messages handled per wake-up
_UCRED = struct.Struct("iII")  # pid, uid, gid
_CRED_SPACE = socket.CMSG_SPACE(_UCRED.size)
log = logging.getLogger("ember.pool")


class AsyncChannel(Generic[T]):
    """Sends commands (optionally with one fd) and dispatches incoming messages to `on_message`
    with the sender's pid as this process sees it (SO_PASSCRED: the kernel attaches the
    sender's credentials to every packet and translates its pid out of any pid namespace).

    `on_close` runs once when the peer goes away.
    """

    def __init__(
        self,
        sock: socket.socket,
        incoming: Any,
        on_message: Callable[[T, int], None],
        on_close: Callable[[], None],
    ) -> None:
        self.sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._loop = asyncio.get_running_loop()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(incoming)
        self._on_message = on_message
        self._on_close = on_close
        self.closed = False
        self._out: deque[tuple[bytes, socket.socket | None, int]] = deque()
        self._writing = False
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(
        self, msg: msgspec.Struct, passing: socket.socket | None = None, also: int = -1
    ) -> None:
        """Queue a message (and a socket whose fd rides along; the channel closes it once sent;
        and, after it, a copy of the fd `also`, which stays the caller's).

        Never blocks the event loop: what the kernel does not take now is sent when the socket
        is writable again. Raises ConnectionError when the peer is gone.
        """
        data = self._encoder.encode(msg)
        if self.closed or len(data) > MAX_CONTROL_PACKET:
            if passing is not None:
                passing.close()
            if self.closed:
                raise ConnectionError("channel closed")
            raise PlatformError(
                f"a {type(msg).__name__} message of {len(data)} bytes exceeds "
                f"the {MAX_CONTROL_PACKET} byte limit of a control message"
            )
        self._out.append((data, passing, os.dup(also) if also >= 0 else -1))
        if len(self._out) == 1:
            self._flush()
        if self.closed:
            raise ConnectionError("channel closed")

    def _flush(self) -> None:
        while self._out:
            data, passing, also = self._out[0]
            try:
                if passing is None:
                    self.sock.send(data)
                else:
                    fds = [passing.fileno(), *([also] if also >= 0 else [])]
                    socket.send_fds(self.sock, [data], fds)
            except BlockingIOError:
                if not self._writing:
                    self._loop.add_writer(self.sock.fileno(), self._flush)
                    self._writing = True
                return
            except OSError as exc:
                if exc.errno != errno.EMSGSIZE:  # the peer is gone: what it said last counts
                    self._readable()  # (e.g. why it failed); closes at its EOF
                    self.close()
                    return
                log.error("dropped a control message of %d bytes: %s", len(data), exc)
            self._out.popleft()
            if passing is not None:
                passing.close()
            if also >= 0:
                os.close(also)
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
            self._writing = False

    def _readable(self) -> None:
        # A bounded batch per wake-up: a peer that floods (the user's code runs in zygotes)
        # must not hold the event loop; the reader fires again on the next turn.
        for _ in range(BATCH):
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(MAX_CONTROL_PACKET, _CRED_SPACE)
            except BlockingIOError:
                return
            except ConnectionResetError:  # the peer closed with our last message unread: the
                continue  # error comes once, ahead of what it sent before closing, then EOF
            except OSError:
                data, ancillary = b"", []
            if not data:
                self.close()
                return
            sender = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = _UCRED.unpack_from(payload)[0]
            try:
                msg = self._decoder.decode(data)
            except msgspec.DecodeError as exc:  # not our runtime talking: stop listening
                log.warning("closing a control channel after an invalid message: %s", exc)
                self.close()
                return
            self._on_message(msg, sender)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        if self._writing:
            self._loop.remove_writer(self.sock.fileno())
        for _data, passing, also in self._out:
            if passing is not None:
                passing.close()
            if also >= 0:
                os.close(also)
        self._out.clear()
        self.sock.close()
        self._on_close()
