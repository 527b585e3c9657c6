"""The node's memory budget: what instances and zygotes may use, and who makes room.

Policy: **what is at rest counts what it really uses; what works counts its cap.**

* A revision with requests in flight or waiting counts each of its instances, running or
  starting, at its function's `memory:` (the instance's cgroup cap: what it may grow to).
* A revision at rest (nothing in flight or waiting) counts each idle instance, its zygote and
  its spare instance (`prefork.py`) at the memory it was measured to use (PSS, read on the
  cgroup worker thread soon after it came to rest and every minute while it stays at rest,
  `usage.py`). An idle process seldom grows, and its cgroup caps it if it does. Until it is
  measured, or where it cannot be measured, it counts at `memory:` too, with two exceptions:
  an instance whose results reported its peak RSS counts that (shared pages included, so
  more than it adds), and a spare, a fork of its zygote that served nothing, counts what its
  zygote was measured to use (its `on_fork` hooks' allocations show at its first
  measurement, a second or so later). An instance that served requests since it was
  measured counts its measurement plus what its peak RSS grew by meanwhile (each result
  reports it), at most `memory:`, until measured again (at most every 5 s): a pass of warm
  requests over a thousand functions does not make them look full. (A page it shared with
  its zygote and then wrote is not in that growth: the next measurement sees it.)
* A start that would go over the budget evicts idle instances, then zygotes (with their spare)
  of revisions with nothing running, least recently used first, never below another
  revision's `scale.min` (room for which is kept free, at `memory:` per instance); otherwise
  it waits for memory to be freed, bounded, then gets 429.
* The namespace quotas keep counting every instance and zygote at `memory:`: that is the
  user's contract (`Pool.check_quota`), whatever they happen to use.

So a thousand trivial functions at rest hold a few MB each, not 128 MB each, and the budget
evicts only as their real use (plus the caps of what works) nears it.

The budget only sees `Occupant`s: each says what it counts now and what it still needs for its
`scale.min`, and offers `Eviction`s; the budget picks among the offers and never edits an
occupant itself. Occupants tell the budget when what they count may have changed
(`account`), and the budget counts those again when its totals are next read: a start's check
costs the same however many functions the node holds, a warm request's steps between idle and
busy cost a set insertion, and only an eviction looks at every occupant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from ember.errors import CapacityError

log = logging.getLogger("ember.pool")
KB = 1024  # kB per MB


class Eviction(NamedTuple):
    """An offer: `evict()` frees `kb` (False if it no longer can, e.g. the instance got busy)."""

    last_used: float  # monotonic: least recently used goes first
    zygote: bool  # zygotes go after every idle instance
    kb: int
    what: str
    evict: Callable[[], bool]


class Occupant(Protocol):
    """A revision's pool as the budget sees it."""

    @property
    def label(self) -> str: ...
    @property
    def memory_mb(self) -> int: ...  # one instance (or the zygote) of it, its cap
    @property
    def zygote_alive(self) -> bool: ...
    @property
    def within_min(self) -> bool: ...  # one more instance would not exceed its scale.min

    def counted_kb(self) -> int: ...  # what it counts now, by the policy above
    def reserve_kb(self) -> int: ...  # what it still needs to reach its scale.min
    def evictions(self, asking: bool) -> list[Eviction]: ...


class MemoryBudget:
    def __init__(self, mb: int, wait: float, occupants: Callable[[], Iterable[Occupant]]) -> None:
        self.mb = mb
        self.wait = wait  # seconds a start may wait for memory
        self._occupants = occupants  # every one: for evictions only
        self._freed = asyncio.Event()
        self._counted: dict[Occupant, tuple[int, int]] = {}  # (counted, reserve) kB, as told
        self._used_kb = 0
        self._reserved_kb = 0
        self._changed: set[Occupant] = set()  # told of, not counted again yet
        self._waiting = 0  # starts in make_room waiting for memory to be freed

    # ---- the totals, kept as occupants change ----
    def account(self, occupant: Occupant) -> None:
        """`occupant` may count something else now. Counted again when the totals are next
        read (a request's every step from idle to busy and back tells, and reads nothing), or
        at once while a start waits for memory (it may have been freed)."""
        self._changed.add(occupant)
        if self._waiting:
            self._count_changed()

    def _count_changed(self) -> None:
        changed, self._changed = self._changed, set()
        for occupant in changed:
            self._set(occupant, (occupant.counted_kb(), occupant.reserve_kb()))

    def leave(self, occupant: Occupant) -> None:
        """`occupant` is gone: it counts nothing any more."""
        self._changed.discard(occupant)
        self._set(occupant, (0, 0))
        self._counted.pop(occupant, None)

    def _set(self, occupant: Occupant, now: tuple[int, int]) -> None:
        before = self._counted.get(occupant, (0, 0))
        if now == before:
            return
        self._counted[occupant] = now
        self._used_kb += now[0] - before[0]
        self._reserved_kb += now[1] - before[1]
        if now[0] < before[0] or now[1] < before[1]:
            self.freed()

    def used_kb(self) -> int:
        self._count_changed()
        return self._used_kb

    def used_mb(self) -> int:
        """What every instance, zygote and spare counts now (see the policy), in MB."""
        return -(-self.used_kb() // KB)

    def _others_reserve_kb(self, asking: Occupant) -> int:
        """What the other live revisions need to reach their scale.min: kept free for them."""
        self._count_changed()
        return self._reserved_kb - self._counted.get(asking, (0, 0))[1]

    # ---- starts ----
    async def make_room(self, asking: Occupant, loop_deadline: float | None) -> None:
        """Return when one more instance of `asking` (counted as starting) fits in the node's
        budget: evict idle instances, then idle zygotes, least recently used first; else wait
        for memory to be freed, until the request's deadline or `budget_wait`, then 429."""
        loop = asyncio.get_running_loop()
        waited_until = loop.time() + self.wait
        if loop_deadline is not None:
            waited_until = min(waited_until, loop_deadline)
        while True:
            self.account(asking)  # the start itself counts already, at its cap
            # Its zygote may not yet count: it will, at its cap, until it is measured.
            zygote = 0 if asking.zygote_alive else asking.memory_mb * KB
            reserved = 0 if asking.within_min else self._others_reserve_kb(asking)
            short = self.used_kb() + zygote + reserved - self.mb * KB
            if short <= 0:
                return
            # A start of the autoscaler or `ember scale` only evicts for scale.min.
            evicting = loop_deadline is not None or asking.within_min
            freed = self._evict(short, asking) if evicting else 0
            if freed >= short:
                continue  # stopped instances leave the count at once
            remaining = waited_until - loop.time()
            if loop_deadline is None or remaining <= 0:
                raise self._spent(asking, asking.memory_mb + zygote // KB, reserved // KB)
            self._freed.clear()
            self._waiting += 1
            try:
                self._count_changed()  # what changed before it waited may have freed some
                if not self._freed.is_set():
                    await asyncio.wait_for(self._freed.wait(), remaining)
            except TimeoutError:
                pass
            finally:
                self._waiting -= 1

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
        first, until `short` kB are freed; kB freed."""
        offers = [e for o in self._occupants() for e in o.evictions(asking=o is asking)]
        freed = 0
        for offer in sorted(offers, key=lambda e: (e.zygote, e.last_used)):
            if freed >= short:
                break
            if offer.evict():
                freed += offer.kb
                log.info("evicted %s for memory", offer.what)
        return freed

    def freed(self) -> None:
        """Memory went back: starts waiting for some look again."""
        self._freed.set()

    # ---- what only uses free memory ----
    def fits(self, asking: Occupant, kb: int) -> bool:
        """Whether `kb` more for `asking` fit without evicting, room for scale.min kept."""
        self.account(asking)
        return self.used_kb() + self._others_reserve_kb(asking) + kb <= self.mb * KB

    def check_prewarm(self, asking: Occupant) -> None:
        """A pre-warm only uses memory that is free: it never evicts nor waits."""
        if not self.fits(asking, asking.memory_mb * KB):
            raise CapacityError(
                f"no memory to pre-warm {asking.label} within the node's budget",
                code="memory_budget",
            )
