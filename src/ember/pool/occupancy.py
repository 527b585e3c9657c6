"""A revision's pool as the node's memory budget and its measurer see it.

`Occupancy` is the budget's `Occupant` (budget.py: what the revision counts now, what it
needs for its `scale.min`, the evictions it offers) and the measurer's `Measurable`
(usage.py: its processes at rest and their pids). It holds no state of its own: it reads what
the revision's pool holds through `Held`, and evicts through the pool's own methods.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

from ember.pool.budget import KB, Eviction
from ember.pool.instance import Instance
from ember.pool.prefork import SpareInstance
from ember.pool.target import Target
from ember.pool.zygote import FunctionZygote


class Held(Protocol):
    """What the occupancy reads of a revision's pool, and the evictions it may ask for."""

    @property
    def target(self) -> Target: ...
    @property
    def instances(self) -> dict[str, Instance]: ...
    @property
    def zygote(self) -> FunctionZygote | None: ...
    @property
    def spare(self) -> SpareInstance: ...
    @property
    def starting(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def zygote_alive(self) -> bool: ...
    @property
    def at_rest(self) -> bool: ...  # no request in flight or waiting
    @property
    def protected(self) -> int: ...  # instances it must keep: scale.min while it gets traffic
    @property
    def standby(self) -> bool: ...
    @property
    def retired(self) -> bool: ...

    def ready_zygote(self) -> FunctionZygote | None: ...
    def idle_oldest_first(self) -> list[Instance]: ...
    def evict_instance(self, inst: Instance) -> bool: ...
    def evict_zygote(self) -> bool: ...


class Occupancy:
    def __init__(self, held: Held, changed: Callable[[], None]) -> None:
        self._held = held
        self._changed = changed  # measurements came in: the budget must look again

    @property
    def label(self) -> str:
        return self._held.target.label

    @property
    def memory_mb(self) -> int:
        return self._held.target.spec.memory

    @property
    def zygote_alive(self) -> bool:
        return self._held.zygote_alive

    @property
    def within_min(self) -> bool:
        held = self._held
        return held.count <= held.target.spec.scale.min and not held.standby

    def declared_mb(self) -> int:
        """Every instance (running or starting) and the zygote at `memory:`: the namespace
        quotas' count, the user's contract (the spare is not one of its instances)."""
        return (self._held.count + self._held.zygote_alive) * self.memory_mb

    def counted_kb(self) -> int:
        """What the budget counts (budget.py): at rest, idle processes at their measured use;
        starts, instances of a revision with requests, and whatever is not measured at cap."""
        held, cap = self._held, self.memory_mb * KB
        total = held.starting * cap
        if held.at_rest:
            total += sum(i.rest_kb(cap) for i in held.instances.values())
        else:
            total += len(held.instances) * cap
        zygote = held.zygote
        if zygote is not None and not zygote.dead:
            total += zygote.measured_kb or cap
        elif held.zygote_alive:
            total += cap  # being started
        # The spare is a fork of the zygote: until it is measured, it counts the zygote's use.
        zygote_kb = (zygote.measured_kb or None) if zygote is not None else None
        spare = held.spare.instance
        if spare is not None:
            total += spare.rest_kb(cap, zygote_kb)
        elif held.spare.pending:
            total += min(cap, zygote_kb or cap)
        return total

    def reserve_kb(self) -> int:
        """What it still needs to reach scale.min (its zygote included), at `memory:`."""
        held = self._held
        if held.count >= held.protected:
            return 0
        return (held.protected - held.count + (not held.zygote_alive)) * self.memory_mb * KB

    # ---- measurements (usage.py) ----
    def measurable(self) -> list[tuple[object, int]]:
        """Its processes to measure now, with their host pids: the zygote and the spare, and
        idle instances while the revision is at rest."""
        held = self._held
        out: list[tuple[object, int]] = []
        zygote = held.ready_zygote()
        if zygote is not None and zygote.pid:
            out.append((zygote, zygote.pid))
        spare = held.spare.instance
        if spare is not None and spare.pid and not spare.dead:
            out.append(((spare, spare.calls), spare.pid))
        if held.at_rest:
            for inst in held.instances.values():
                if inst.pid and not inst.dead and not inst.busy:
                    out.append(((inst, inst.calls), inst.pid))
        return out

    def measured(self, values: list[tuple[object, int]]) -> bool:
        """Measurements (kB) of what `measurable` listed; True: measure it again later. An
        instance that served a request since it was listed keeps counting at its cap."""
        for what, kb in values:
            if isinstance(what, FunctionZygote):
                what.measured_kb = kb
            elif isinstance(what, tuple):
                inst, calls = what
                inst.measured(calls, kb)
        self._changed()
        return self._held.zygote_alive and not self._held.retired

    # ---- evictions ----
    def evictions(self, asking: bool) -> list[Eviction]:
        """Idle instances above scale.min, then the zygote (and its spare) once everything in
        it may go; nothing of the asking revision (it would only start them again)."""
        if asking:
            return []
        held, cap = self._held, self.memory_mb * KB
        may_go = held.count - held.protected
        idle = held.idle_oldest_first()
        offers = [
            Eviction(
                i.idle_since,
                False,
                i.rest_kb(cap) if held.at_rest else cap,
                f"an instance of {self.label}",
                functools.partial(held.evict_instance, i),
            )
            for i in idle[: max(0, may_go)]
        ]
        zygote = held.ready_zygote()
        everything_idle = len(idle) == held.count and not held.starting and held.at_rest
        if zygote is not None and everything_idle and may_go >= held.count:
            spare = held.spare.instance
            kb = (zygote.measured_kb or cap) + (spare.rest_kb(cap) if spare is not None else 0)
            what = f"the zygote of {self.label}"
            offers.append(Eviction(zygote.last_used, True, kb, what, held.evict_zygote))
        return offers
