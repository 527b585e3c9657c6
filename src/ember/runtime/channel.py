"""Blocking message channels of the zygotes: one SOCK_SEQPACKET packet = one msgpack message.

Packets keep message boundaries, and a file descriptor passed with SCM_RIGHTS arrives with
exactly the packet that carries it.
"""

from __future__ import annotations

import socket
from typing import Any, Generic, TypeVar

import msgspec

from ember.wire.messages import MAX_CONTROL_PACKET

T = TypeVar("T")


_decoders: dict[Any, Any] = {}


def decoder_for(kind: Any) -> Any:
    """One decoder per message family, built once (in the root zygote) and inherited."""
    if kind not in _decoders:
        _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return _decoders[kind]


class Channel(Generic[T]):
    def __init__(self, sock: socket.socket, incoming: Any) -> None:
        self.sock = sock
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[T] = decoder_for(incoming)

    def send(self, msg: msgspec.Struct) -> None:
        self.sock.send(self._encoder.encode(msg))

    def recv(self) -> tuple[T, list[int]] | None:
        """The next message and the fds that came with it; None when the peer is gone."""
        data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_CONTROL_PACKET, 4)
        if not data:
            for fd in fds:
                socket.close(fd)
            return None
        return self._decoder.decode(data), fds
