"""The spare zygote: a zygote-to-be already in cgroups of its own, waiting for a function.

Placing a process in a cgroup can wait out an RCU grace period (5-20 ms), so in the root
sandbox the pool keeps a few spares (`READY`) that took that step ahead of need: a specialize
start only writes the revision's limits into a spare's cgroups and sends it the spec. New
spares are made in the background, side by side, after each one is used: with one spare, a
deploy every 25 ms (an API client deploying many functions) found it still being made about
every other time and paid the placement itself.
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
READY = 3  # spares kept (each ~1.6 MB of private memory and three cgroup directories)


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
    def __init__(self, root: RootZygote, placement: Placement, ready: int = READY) -> None:
        self.root = root
        self.placement = placement
        self.enabled = False  # only in the root sandbox with cgroups
        self.ready = ready
        self._spares: list[Spare] = []  # oldest first
        self._making: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def take(self, spec: FunctionSpec, zygote_mb: int) -> Spare | None:
        """A spare, given `spec`'s limits, or None (none ready, or it could not be used)."""
        cgroups = self.placement.cgroups
        while self._spares and cgroups is not None:
            spare = self._spares.pop(0)
            if not _alive(spare.sock):  # e.g. the root zygote was restarted since
                self._drop(spare)
                continue
            try:  # not behind the cgroup thread's queue: a deploy or a start waits for this
                await self.placement.run_now(
                    cgroups.assign, spare.slug, spare.joins[-1], zygote_mb, spec.pids, spec.cpu
                )
            except OSError as exc:
                log.warning("could not hand a spare zygote over: %s", exc)
                self._drop(spare)
                return None
            return spare
        return None

    def replenish(self) -> None:
        """Start making spares until `ready` are there or on their way."""
        if not self.enabled or self._stopping:
            return
        loop = asyncio.get_running_loop()
        while len(self._spares) + len(self._making) < self.ready:
            task = loop.create_task(self._make())
            self._making.add(task)
            task.add_done_callback(self._making.discard)

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
        except asyncio.CancelledError:
            if sock is not None:
                sock.close()
            self.placement.drop_tree(slug)
            raise
        self._spares.append(Spare(slug, joins, sock))

    def _drop(self, spare: Spare) -> None:
        spare.sock.close()  # it sees EOF and exits
        self.placement.drop_tree(spare.slug)

    @property
    def count(self) -> int:
        """Spares ready now."""
        return len(self._spares)

    async def shutdown(self) -> None:
        self._stopping = True
        for task in list(self._making):
            task.cancel()
        for task in list(self._making):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for spare in self._spares:
            spare.sock.close()
        self._spares.clear()
