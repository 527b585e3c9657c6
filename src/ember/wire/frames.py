"""Length-prefixed framing: a 4-byte big-endian length, then a msgpack body.

`FrameDecoder` is fed bytes as they arrive and yields whole frames; it never does I/O, so the
server's asyncio protocol and the zygotes' blocking loops share it.
"""

from __future__ import annotations

import struct

MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")


class FrameTooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the {MAX_FRAME} byte limit")
        self.size = size


def frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise FrameTooLarge(len(payload))
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Accumulates bytes and splits them into frames."""

    __slots__ = ("_buf", "_need")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = -1

    def feed(self, data: bytes) -> list[bytes]:
        if self._need < 0 and not self._buf and len(data) >= 4:  # the usual read: whole frames
            (need,) = _HEADER.unpack_from(data)
            if len(data) == 4 + need and need <= MAX_FRAME:
                return [data[4:]]
        self._buf += data
        frames: list[bytes] = []
        while True:
            if self._need < 0:
                if len(self._buf) < 4:
                    return frames
                (self._need,) = _HEADER.unpack_from(self._buf)
                if self._need > MAX_FRAME:
                    raise FrameTooLarge(self._need)
                del self._buf[:4]
            if len(self._buf) < self._need:
                return frames
            frames.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = -1
