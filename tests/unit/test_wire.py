"""Framing and message round trips."""

from __future__ import annotations

import msgspec
import pytest

from ember.wire.frames import MAX_FRAME, FrameDecoder, FrameTooLarge, frame
from ember.wire.messages import InstanceCommand, InstanceMessage, Invoke, Log, Result


def test_frames_split_anywhere_are_reassembled() -> None:
    payloads = [b"", b"a", bytes(range(256)) * 100, b"z" * 70_000]
    stream = b"".join(frame(p) for p in payloads)
    for step in (1, 3, 4, 5, 4096, len(stream)):
        decoder = FrameDecoder()
        got: list[bytes] = []
        for i in range(0, len(stream), step):
            got += decoder.feed(stream[i : i + step])
        assert got == payloads


def test_oversized_frames_are_refused() -> None:
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed((MAX_FRAME + 1).to_bytes(4, "big"))


def test_messages_round_trip_as_tagged_unions() -> None:
    enc = msgspec.msgpack.Encoder()
    inv = Invoke(
        id="r1",
        method="POST",
        path="/ü",
        query=b"a=1&a=2",
        headers=[(b"x", b"\xff")],
        body=bytes(range(256)),
        deadline=1.5,
    )
    assert msgspec.msgpack.decode(enc.encode(inv), type=InstanceCommand) == inv
    res = Result(id="r1", status=201, headers=[], body=b"\x00")
    log = Log(id="r1", stream="stdout", ts=1.0, data="hi\n")
    for msg in (res, log):
        assert msgspec.msgpack.decode(enc.encode(msg), type=InstanceMessage) == msg
