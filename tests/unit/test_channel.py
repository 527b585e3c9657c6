"""The server's control channel never blocks the event loop, even when the peer stops reading."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import msgspec

from ember.pool.channel import AsyncChannel
from ember.wire.messages import Forked, ForkInstance, ZygoteMessage


def test_sends_queue_when_the_peer_is_not_reading_and_fds_arrive_in_order() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    received: list[tuple[str, int]] = []
    n = 800  # far more than the socket buffer holds

    def peer() -> None:
        decoder = msgspec.msgpack.Decoder(ForkInstance)
        while len(received) < n:
            data, fds, _flags, _addr = socket.recv_fds(theirs, 65536, 1)
            received.append((decoder.decode(data).instance, len(fds)))
            for fd in fds:
                socket.close(fd)

    async def main() -> None:
        channel: AsyncChannel[ZygoteMessage] = AsyncChannel(
            ours, ZygoteMessage, lambda _m, _pid: None, lambda: None
        )
        for i in range(n):  # returns at once every time: nothing reads yet
            a, b = socket.socketpair()
            a.close()
            channel.send(ForkInstance(instance=str(i)), b)
        assert channel._out, "the kernel buffer filled up and the rest waits in the queue"
        reader = threading.Thread(target=peer)
        reader.start()
        while len(received) < n:
            await asyncio.sleep(0.01)
        reader.join()
        channel.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    theirs.close()
    assert [r[0] for r in received] == [str(i) for i in range(n)]
    assert all(count == 1 for _, count in received)


def test_the_sender_pid_comes_from_the_kernel_not_the_message() -> None:
    """Instances in a pid namespace report their own pid as it looks in there; the server
    must use the pid the kernel attaches (SO_PASSCRED), which is the host's."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    got: list[tuple[ZygoteMessage, int]] = []

    async def main() -> None:
        channel: AsyncChannel[ZygoteMessage] = AsyncChannel(
            ours, ZygoteMessage, lambda m, pid: got.append((m, pid)), lambda: None
        )
        pid = os.fork()
        if pid == 0:
            try:
                theirs.send(msgspec.msgpack.encode(Forked(instance="i", pid=2)))
            finally:
                os._exit(0)
        await asyncio.to_thread(os.waitpid, pid, 0)
        while not got:
            await asyncio.sleep(0.01)
        channel.close()
        assert got == [(Forked(instance="i", pid=2), pid)]

    asyncio.run(asyncio.wait_for(main(), 10))
    theirs.close()
