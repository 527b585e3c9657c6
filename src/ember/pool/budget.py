"""The node's memory budget: what instances and zygotes may use, and who makes room.

Every instance (running or starting) and every zygote counts as its function's `memory:`
setting, the accounting of the namespace quotas too. A start that would go over the budget
evicts idle instances, then zygotes with nothing running, least recently used first, never
below another revision's `scale.min` (room for which is kept free); otherwise it waits for
memory to be freed, bounded, then gets 429.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ember.errors import CapacityError
from ember.pool.instance import Instance
from ember.pool.target import RevisionKey

if TYPE_CHECKING:
    from ember.pool.revision import RevisionPool

log = logging.getLogger("ember.pool")


class MemoryBudget:
    def __init__(self, mb: int, wait: float, revisions: dict[RevisionKey, RevisionPool]) -> None:
        self.mb = mb
        self.wait = wait  # seconds a start may wait for memory
        self._revisions = revisions  # the pool's, shared
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
        return sum((rp.count + rp.zygote_alive) * rp.spec.memory for rp in self._revisions.values())

    def _reserved_mb(self, asking: RevisionPool) -> int:
        """What the other live revisions need to reach their scale.min: kept free for them."""
        need = 0
        for rp in self._revisions.values():
            if rp is asking or rp.retired or rp.standby or rp.count >= rp.spec.scale.min:
                continue
            zygote = 0 if rp.zygote_alive else 1
            need += (rp.spec.scale.min - rp.count + zygote) * rp.spec.memory
        return need

    async def make_room(self, rp: RevisionPool, loop_deadline: float | None) -> None:
        """Return when one more instance of `rp` fits in the node's budget: evict idle
        instances, then idle zygotes, least recently used first; else wait for memory to be
        freed, until the request's deadline or `budget_wait`, then 429 naming the budget."""
        loop = asyncio.get_running_loop()
        waited_until = loop.time() + self.wait
        if loop_deadline is not None:
            waited_until = min(waited_until, loop_deadline)
        while True:
            # The instance itself already counts (as starting); its zygote may not yet.
            zygote = 0 if rp.zygote_alive else rp.spec.memory
            need = rp.spec.memory + zygote
            within_min = rp.count <= rp.spec.scale.min and not rp.standby
            reserved = 0 if within_min else self._reserved_mb(rp)
            short = self.used_mb() + zygote + reserved - self.mb
            if short <= 0:
                return
            # A start of the autoscaler or `ember scale` only evicts for scale.min.
            evicting = loop_deadline is not None or within_min
            freed = self._evict(short, rp) if evicting else 0
            if freed >= short:
                continue  # stopped instances leave the count at once
            remaining = waited_until - loop.time()
            if loop_deadline is None or remaining <= 0:
                kept = f", {reserved} MB kept for scale.min of others" if reserved else ""
                raise CapacityError(
                    f"the node's memory budget is spent: {self.used_mb() - rp.spec.memory} of "
                    f"{self.mb} MB in use{kept}; function '{rp.target.function}' needs "
                    f"{need} MB more. Retry later, lower memory: or scale.max, or give the "
                    "server more (ember up --memory-budget MB)",
                    code="memory_budget",
                    headers={"Retry-After": "1"},
                )
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), remaining)
            except TimeoutError:
                pass

    def _evict(self, short: int, asking: RevisionPool) -> int:
        """Stop idle instances (above their revision's scale.min), then zygotes with nothing
        running, least recently used first, until `short` MB are freed; MB freed."""
        candidates: list[tuple[float, int, RevisionPool, Instance | None]] = []
        for rp in self._revisions.values():
            may_go = rp.count - (0 if rp.retired or rp.standby else rp.spec.scale.min)
            spare = 0 if rp is asking else may_go  # never its own: it would start them again
            idle = sorted(
                (i for i in rp.instances.values() if not i.busy and not i.dead),
                key=lambda i: i.idle_since,
            )
            for inst in idle[: max(0, spare)]:
                candidates.append((inst.idle_since, 0, rp, inst))
            zygote = rp.zygote
            if (
                rp is not asking
                and zygote is not None
                and zygote.ready.done()
                and not zygote.dead
                and not rp.starting
                and not rp.demand
                and len(idle) == rp.count  # everything in it is idle
                and may_go >= rp.count  # and may go
            ):
                candidates.append((zygote.last_used, 1, rp, None))
        freed = 0
        for _since, _kind, rp, victim in sorted(candidates, key=lambda c: (c[1], c[0])):
            if freed >= short:
                break
            if victim is not None:
                victim.stop()
                rp.forget(victim)
            elif not rp.instances:
                rp.release_zygote()
            else:
                continue  # its instances are not all gone yet
            freed += rp.spec.memory
            what = "an instance" if victim is not None else "the zygote"
            log.info("evicted %s of %s for memory", what, rp.target.label)
        return freed

    def freed(self) -> None:
        """Memory went back: starts waiting for some look again."""
        self._freed.set()

    def check_prewarm(self, rp: RevisionPool) -> None:
        """A pre-warm only uses memory that is free: it never evicts nor waits."""
        if self.used_mb() + self._reserved_mb(rp) + rp.spec.memory > self.mb:
            raise CapacityError(
                f"no memory to pre-warm {rp.target.label} within the node's budget",
                code="memory_budget",
            )
