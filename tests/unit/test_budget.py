"""The memory budget's policy and its bookkeeping: what is at rest counts what it uses, what
works counts its cap, and a start's check does not look at every function."""

from __future__ import annotations

import asyncio

import pytest

from ember.errors import CapacityError
from ember.pool.budget import KB, Eviction, MemoryBudget
from ember.pool.host import PoolSettings
from ember.pool.instance import Instance
from ember.pool.revision import RevisionPool
from ember.pool.target import Target
from ember.spec import FunctionSpec


class _Occupant:
    def __init__(self, label: str, counted_mb: int, memory_mb: int = 128) -> None:
        self.label = label
        self.memory_mb = memory_mb
        self.zygote_alive = True
        self.within_min = False
        self.counted = counted_mb * KB
        self.evicted = False
        self.budget: MemoryBudget | None = None  # told when it changes, as a pool tells it

    def counted_kb(self) -> int:
        return 0 if self.evicted else self.counted

    def reserve_kb(self) -> int:
        return 0

    def evictions(self, asking: bool) -> list[Eviction]:
        if asking or self.evicted:
            return []
        return [Eviction(0.0, True, self.counted, f"the zygote of {self.label}", self._evict)]

    def _evict(self) -> bool:
        self.evicted = True
        if self.budget is not None:
            self.budget.account(self)
        return True


def test_totals_follow_what_occupants_say_and_a_start_that_fits_looks_at_no_one() -> None:
    looked = []
    many = [_Occupant(f"f{i}", 4) for i in range(1000)]  # a thousand functions at rest, 4 MB

    def occupants() -> list[_Occupant]:
        looked.append(1)
        return many

    budget = MemoryBudget(24 * 1024, 1.0, occupants)
    for o in many:
        budget.account(o)
    assert budget.used_mb() == 4000
    asking = _Occupant("new", 128)
    asyncio.run(budget.make_room(asking, None))
    assert looked == []  # no walk over the functions: the totals are kept as they change
    many[0].counted = 1 * KB
    budget.account(many[0])
    budget.leave(many[1])
    assert budget.used_mb() == 4000 - 3 - 4 + 128


def test_a_start_over_the_budget_evicts_least_recently_used_then_waits_in_vain() -> None:
    idle = _Occupant("idle", 100)
    budget = MemoryBudget(200, 0.05, lambda: [idle, asking])
    asking = _Occupant("asking", 128)
    idle.budget = budget
    budget.account(idle)
    with pytest.raises(CapacityError):  # a start of the autoscaler only evicts for scale.min
        asyncio.run(budget.make_room(asking, None))
    assert not idle.evicted

    async def request() -> None:
        await budget.make_room(asking, asyncio.get_running_loop().time() + 0.05)

    asyncio.run(request())
    assert idle.evicted and budget.used_mb() == 128
    hog = _Occupant("hog", 150)
    budget.account(hog)
    with pytest.raises(CapacityError, match="memory budget is spent"):
        asyncio.run(request())


TARGET = Target("fn", 1, "0" * 64, "/nonexistent", FunctionSpec(name="fn", memory=128))


class _Host:
    def account(self, rp: RevisionPool) -> None:
        pass

    async def start_zygote(self, target: Target) -> None:
        raise AssertionError("no zygote in this test")

    def system_log(self, target: Target, text: str) -> None:
        pass

    def activity(self, target: Target, busy: bool, now: float) -> None:
        pass


def test_a_revision_counts_its_idle_processes_as_measured_at_rest_and_at_cap_at_work() -> None:
    async def main() -> None:
        rp = RevisionPool(TARGET, _Host(), PoolSettings(queue_depth=10, init_timeout=5))  # type: ignore[arg-type]
        cap = 128 * KB
        a = Instance("fn-1-a", 1, lambda _i, _m: None, lambda _i: None)
        b = Instance("fn-1-b", 1, lambda _i, _m: None, lambda _i: None)
        rp.instances = {a.id: a, b.id: b}
        assert rp.occupancy.counted_kb() == 2 * cap  # not measured yet: at their cap
        a.peak_kb = 20 * KB  # its first result reported its peak RSS
        assert rp.occupancy.counted_kb() == 20 * KB + cap
        a.measured(a.calls, 2 * KB)
        b.measured(b.calls, 3 * KB)
        assert rp.occupancy.counted_kb() == 5 * KB  # at rest: what they use
        rp.demand = 1
        assert rp.occupancy.counted_kb() == 2 * cap  # a request in flight: all at their cap
        rp.demand = 0
        b.calls += 1  # it served one since it was measured, its peak RSS unchanged
        assert rp.occupancy.counted_kb() == 5 * KB
        b.peak_kb += 50 * KB  # ... and one that grew its peak RSS by 50 MB
        b.calls += 1
        assert rp.occupancy.counted_kb() == 55 * KB
        b.peak_kb += 500 * KB  # never more than its cap
        b.calls += 1
        assert rp.occupancy.counted_kb() == 2 * KB + cap
        rp.starting = 1
        assert rp.occupancy.counted_kb() == 2 * KB + 2 * cap  # a start counts at its cap
        assert rp.occupancy.declared_mb() == 3 * 128  # what the namespace quotas count

    asyncio.run(main())


class _Offers:
    """An occupant that offers fixed evictions and records which were taken."""

    def __init__(self, label: str, offers: list[tuple[float, bool, int]], taken: list[str]):
        self.label = label
        self.memory_mb = 64
        self.zygote_alive = True
        self.within_min = False
        self._offers = offers
        self._taken = taken
        self.budget: MemoryBudget | None = None

    def counted_kb(self) -> int:
        return sum(kb for _t, _z, kb in self._offers)

    def reserve_kb(self) -> int:
        return 0

    def evictions(self, asking: bool) -> list[Eviction]:
        if asking:
            return []
        return [
            Eviction(
                t,
                z,
                kb,
                f"{self.label} {'zygote' if z else 'instance'} {t:g}",
                lambda o=(t, z, kb): self._take(o),
            )
            for t, z, kb in self._offers
        ]

    def _take(self, offer: tuple[float, bool, int]) -> bool:
        self._offers.remove(offer)
        self._taken.append(f"{self.label} {'zygote' if offer[1] else 'instance'} {offer[0]:g}")
        assert self.budget is not None
        self.budget.account(self)
        return True


def test_evictions_take_idle_instances_least_recently_used_first_then_zygotes() -> None:
    taken: list[str] = []
    a = _Offers("a", [(5.0, False, 3 * KB), (1.0, True, 4 * KB)], taken)
    b = _Offers("b", [(2.0, False, 3 * KB), (9.0, False, 3 * KB), (0.5, True, 4 * KB)], taken)
    asking = _Offers("asking", [], taken)
    budget = MemoryBudget(64 + 14, 0.0, lambda: [a, b, asking])
    for o in (a, b):
        o.budget = budget
        budget.account(o)
    asking.counted_kb = lambda: 64 * KB  # type: ignore[method-assign]  # its start, at its cap

    async def start() -> None:
        await budget.make_room(asking, asyncio.get_running_loop().time() + 0.05)

    asyncio.run(start())  # 17 MB rest + 64 over 78: 3 MB short, the oldest idle instance goes
    assert taken == ["b instance 2"]
    budget.mb = 64 + 4  # now 14 MB rest: every instance goes, then the older zygote
    asyncio.run(start())
    assert taken == ["b instance 2", "a instance 5", "b instance 9", "b zygote 0.5"]
