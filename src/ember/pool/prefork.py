"""A revision's spare instance: forked ahead of need, so a start from zero is a hand-off.

After about a second of idleness every step of a fork start runs on cold caches: the
ForkInstance round to the zygote, the fork itself, the child's setup and its `on_fork` hooks
took ~4.3 of the ~5.3 ms of such a start over HTTP here (bench/fork_breakdown.py's marks,
requests 1.6 s apart). So when the autoscaler takes a revision back to its floor
(`scale.min`, usually zero) after idleness, its zygote forks one instance in the background:
placed in its memory cgroup, its `on_fork` hooks run, waiting for its first `Invoke`. The next
request that finds no idle instance takes it (tier `spare`) instead of forking; the spare
stands in for the instances that were stopped, so it is made again at the next scale-down,
not at once (nothing is forked beside the request, on a host with two cores).

The spare is not one of the revision's instances: it serves nothing, does not count against
`scale.max` or the namespace's quotas, and the autoscaler never stops it; it goes with its
zygote, with `ember scale N -n 0`, and when the revision stops getting traffic. It counts in
the node's memory budget (at its measured use once measured), and is made only from memory
that is free (never by evicting). A spare that dies before it is used is made again after a
back-off. Its `on_fork` hooks ran when it was forked, which may be long before its first
request: a hook that opens a connection should expect that, as with any idle instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ember.pool.instance import Instance
from ember.pool.zygote import FunctionZygote

log = logging.getLogger("ember.pool")


class SpareInstance:
    def __init__(
        self,
        fork: Callable[[FunctionZygote], Awaitable[Instance]],
        changed: Callable[[], None],
        label: str,
    ) -> None:
        self._fork = fork
        self._changed = changed  # the revision's memory and schedule must look again
        self._label = label
        self.instance: Instance | None = None
        self._zygote: FunctionZygote | None = None  # what it was forked from
        self._task: asyncio.Task[None] | None = None
        self._generation = 0  # a discard makes a fork under way unwanted
        self._failures = 0
        self._no_room = 0  # times in a row it did not fit in the node's free memory
        self.retry_at = 0.0
        self.handoffs = 0

    @property
    def pending(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def held(self) -> bool:
        """A spare exists or is being forked (it counts in memory from the start)."""
        return self.instance is not None or self.pending

    async def take(self, zygote: FunctionZygote) -> Instance | None:
        """The spare, for a request, if it is alive and a child of `zygote`; one being forked
        is waited for (its fork began before the request: it is still the shorter way)."""
        if self.instance is None and self._task is not None and not self._task.done():
            await asyncio.wait({self._task})  # never cancels it, nor raises what ended it
        inst, self.instance = self.instance, None
        if inst is None:
            return None
        if inst.dead or zygote.dead or self._zygote is not zygote:
            inst.stop()
            return None
        self.handoffs += 1
        return inst

    def replenish(self, zygote: FunctionZygote, now: float) -> None:
        """Fork a spare in the background unless one exists, is on its way, or backs off."""
        if self.held or now < self.retry_at:
            return
        self._task = asyncio.get_running_loop().create_task(self._make(zygote, self._generation))
        self._changed()

    async def _make(self, zygote: FunctionZygote, generation: int) -> None:
        try:
            inst = await self._fork(zygote)
        except Exception as exc:
            self._failed(f"could not fork a spare instance of {self._label}: {exc}")
            return
        if generation != self._generation or inst.dead:
            inst.stop()
        else:
            self.instance, self._zygote = inst, zygote
            self._no_room = 0
        self._changed()

    def lost(self, inst: Instance) -> bool:
        """An instance ended: True if it was the spare (it is made again after a back-off)."""
        if inst is not self.instance:
            return False
        self.instance = None
        self._failed(f"the spare instance of {self._label} exited before it was used")
        self._changed()
        return True

    def _failed(self, why: str) -> None:
        self._failures += 1
        delay = min(60.0, 0.5 * 2**self._failures)
        self.retry_at = time.monotonic() + delay
        log.warning("%s; the next one in %.0f s", why, delay)

    def no_room(self, now: float) -> float:
        """It did not fit in the node's free memory: try again later, less often each time."""
        self._no_room += 1
        self.retry_at = now + min(60.0, 0.5 * 2**self._no_room)
        return self.retry_at

    def succeeded(self) -> None:
        """A handed-off spare served its first request: forget the back-off."""
        self._failures = 0
        self.retry_at = 0.0

    def discard(self) -> None:
        """Its zygote goes (or the revision no longer keeps one): stop it, and any on its way."""
        self._generation += 1
        inst, self.instance = self.instance, None
        if inst is not None:
            inst.stop()

    def close(self) -> None:
        """The revision's pool stops (its zygote too): discard, and end a fork under way."""
        self.discard()
        if self._task is not None and not self._task.done():
            self._task.cancel()
