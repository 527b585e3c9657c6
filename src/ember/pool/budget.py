"""The node's memory budget: what instances and zygotes may use, and who makes room.

Every instance (running or starting) and every zygote counts as its function's `memory:`
setting, the accounting of the namespace quotas too. A start that would go over the budget
evicts idle instances, then zygotes with nothing running, least recently used first, never
below another revision's `scale.min` (room for which is kept free); otherwise it waits for
memory to be freed, bounded, then gets 429.

The budget only sees `Occupant`s: each says what it uses, what it still needs for its
`scale.min`, and offers `Eviction`s; the budget picks among the offers and never edits an
occupant itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from ember.errors import CapacityError

log = logging.getLogger("ember.pool")


class Eviction(NamedTuple):
    """An offer: `evict()` frees `mb` (False if it no longer can, e.g. the instance got busy)."""

    last_used: float  # monotonic: least recently used goes first
    zygote: bool  # zygotes go after every idle instance
    mb: int
    what: str
    evict: Callable[[], bool]


class Occupant(Protocol):
    """A revision's pool as the budget sees it."""

    @property
    def label(self) -> str: ...
    @property
    def memory_mb(self) -> int: ...  # one instance (or the zygote) of it
    @property
    def zygote_alive(self) -> bool: ...
    @property
    def within_min(self) -> bool: ...  # one more instance would not exceed its scale.min

    def used_mb(self) -> int: ...
    def reserve_mb(self) -> int: ...  # what it still needs to reach its scale.min
    def evictions(self, asking: bool) -> list[Eviction]: ...


class MemoryBudget:
    def __init__(self, mb: int, wait: float, occupants: Callable[[], Iterable[Occupant]]) -> None:
        self.mb = mb
        self.wait = wait  # seconds a start may wait for memory
        self._occupants = occupants
        self._freed = asyncio.Event()
        self._used_before = 0

    def tick(self) -> None:
        """Whatever freed memory since the last tick (a crash, a drain): wake the waiters."""
        used = self.used_mb()
        if used < self._used_before:
            self.freed()
        self._used_before = used

    def used_mb(self) -> int:
        """Memory of every instance (running or starting) and zygote, each at its setting."""
        return sum(o.used_mb() for o in self._occupants())

    def _reserved_mb(self, asking: Occupant) -> int:
        """What the other live revisions need to reach their scale.min: kept free for them."""
        return sum(o.reserve_mb() for o in self._occupants() if o is not asking)

    async def make_room(self, asking: Occupant, loop_deadline: float | None) -> None:
        """Return when one more instance of `asking` fits in the node's budget: evict idle
        instances, then idle zygotes, least recently used first; else wait for memory to be
        freed, until the request's deadline or `budget_wait`, then 429 naming the budget."""
        loop = asyncio.get_running_loop()
        waited_until = loop.time() + self.wait
        if loop_deadline is not None:
            waited_until = min(waited_until, loop_deadline)
        while True:
            # The instance itself already counts (as starting); its zygote may not yet.
            zygote = 0 if asking.zygote_alive else asking.memory_mb
            reserved = 0 if asking.within_min else self._reserved_mb(asking)
            short = self.used_mb() + zygote + reserved - self.mb
            if short <= 0:
                return
            # A start of the autoscaler or `ember scale` only evicts for scale.min.
            evicting = loop_deadline is not None or asking.within_min
            freed = self._evict(short, asking) if evicting else 0
            if freed >= short:
                continue  # stopped instances leave the count at once
            remaining = waited_until - loop.time()
            if loop_deadline is None or remaining <= 0:
                raise self._spent(asking, asking.memory_mb + zygote, reserved)
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), remaining)
            except TimeoutError:
                pass

    def _spent(self, asking: Occupant, need: int, reserved: int) -> CapacityError:
        kept = f", {reserved} MB kept for scale.min of others" if reserved else ""
        return CapacityError(
            f"the node's memory budget is spent: {self.used_mb() - asking.memory_mb} of "
            f"{self.mb} MB in use{kept}; '{asking.label}' needs {need} MB more. Retry later, "
            "lower memory: or scale.max, or give the server more (ember up --memory-budget MB)",
            code="memory_budget",
            headers={"Retry-After": "1"},
        )

    def _evict(self, short: int, asking: Occupant) -> int:
        """Take the occupants' offers, idle instances first, then zygotes, least recently used
        first, until `short` MB are freed; MB freed."""
        offers = [e for o in self._occupants() for e in o.evictions(asking=o is asking)]
        freed = 0
        for offer in sorted(offers, key=lambda e: (e.zygote, e.last_used)):
            if freed >= short:
                break
            if offer.evict():
                freed += offer.mb
                log.info("evicted %s for memory", offer.what)
        return freed

    def freed(self) -> None:
        """Memory went back: starts waiting for some look again."""
        self._freed.set()

    def check_prewarm(self, asking: Occupant) -> None:
        """A pre-warm only uses memory that is free: it never evicts nor waits."""
        if self.used_mb() + self._reserved_mb(asking) + asking.memory_mb > self.mb:
            raise CapacityError(
                f"no memory to pre-warm {asking.label} within the node's budget",
                code="memory_budget",
            )
