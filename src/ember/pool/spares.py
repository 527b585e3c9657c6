"""The spare zygote: a zygote-to-be already in cgroups of its own, waiting for a function.

Placing a process in a cgroup can wait out an RCU grace period (5-20 ms), so in the root
sandbox the pool keeps one spare that took that step ahead of need: a specialize start only
writes the revision's limits into the spare's cgroups and sends it the spec. A new spare is
made in the background after each one is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from typing import NamedTuple

import msgspec

from ember.pool.placement import Placement
from ember.pool.root import RootZygote
from ember.spec import FunctionSpec
from ember.wire.messages import SpareReady, ZygoteMessage

log = logging.getLogger("ember.pool")
_DECODER = msgspec.msgpack.Decoder(ZygoteMessage)


class Spare(NamedTuple):
    """A zygote-to-be in cgroups of its own, waiting to be given a function."""

    slug: str
    joins: list[str]
    sock: socket.socket


def _alive(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True  # nothing to read: still there
    except OSError:
        return False


class Spares:
    def __init__(self, root: RootZygote, placement: Placement) -> None:
        self.root = root
        self.placement = placement
        self.enabled = False  # only in the root sandbox with cgroups
        self._spare: Spare | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def take(self, spec: FunctionSpec, zygote_mb: int) -> Spare | None:
        """The spare, given `spec`'s limits, or None (none ready, or it could not be used)."""
        spare, self._spare = self._spare, None
        cgroups = self.placement.cgroups
        if spare is None or cgroups is None:
            return None
        if not _alive(spare.sock):  # e.g. the root zygote was restarted since
            self._drop(spare)
            return None
        try:
            await self.placement.run(
                cgroups.assign, spare.slug, spare.joins[-1], zygote_mb, spec.pids, spec.cpu
            )
        except OSError as exc:
            log.warning("could not hand a spare zygote over: %s", exc)
            self._drop(spare)
            return None
        return spare

    def replenish(self) -> None:
        if not self.enabled or self._stopping or self._spare is not None:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._make())

    async def _make(self) -> None:
        cgroups = self.placement.cgroups
        if cgroups is None:
            return
        slug = f"spare-{secrets.token_hex(4)}"
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            joins = await self.placement.run(cgroups.revision, slug, 64, 64, 0.0)
            await self.root.ensure()
            sock = self.root.spawn_blank(joins, split=True, spare=True)
            sock.setblocking(False)
            async with asyncio.timeout(30):  # until it is in its cgroups
                report = _DECODER.decode(await loop.sock_recv(sock, 65536))
            if not isinstance(report, SpareReady):
                raise OSError(f"the spare zygote reported {report!r}")
        except (OSError, TimeoutError, msgspec.DecodeError) as exc:
            log.warning("could not make a spare zygote: %s", exc)
            if sock is not None:
                sock.close()
            self.placement.drop_tree(slug)
            return
        self._spare = Spare(slug, joins, sock)

    def _drop(self, spare: Spare) -> None:
        spare.sock.close()  # it sees EOF and exits
        self.placement.drop_tree(spare.slug)

    async def shutdown(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._spare is not None:
            self._spare.sock.close()
            self._spare = None
