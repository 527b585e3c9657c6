"""What the node's pool does per function when many are deployed: nothing per tick or per
scrape for the ones at rest (issue 9, density)."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

from ember.config import ServerConfig
from ember.pool import manager
from ember.pool.instance import Instance
from ember.pool.manager import Pool
from ember.pool.target import Target
from ember.spec import FunctionSpec, ScaleSpec
from ember.telemetry.buffer import TelemetryBuffer


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _idle_instance(name: str) -> Instance:  # with the event loop running
    inst = Instance(name, 1, lambda _i, _m: None, lambda _i: None)
    inst.connection_made(_Transport())
    return inst


def test_a_revision_at_rest_within_its_idle_grace_sleeps_until_the_grace_ends(
    tmp_path: Path,
) -> None:
    """Regression: a revision keeping one idle instance was stepped every STEP for its whole
    idle grace (10 minutes in the density benchmark): with 1,000 functions called once, the
    ticks took ~40 % of the event loop. Now it sleeps until the grace ends, where its
    instance goes as before."""
    asyncio.run(_sleeps_until_the_grace_ends(tmp_path))


async def _sleeps_until_the_grace_ends(tmp_path: Path) -> None:
    pool = Pool(ServerConfig(home=tmp_path), TelemetryBuffer(1024))
    spec = FunctionSpec(name="f", scale=ScaleSpec(idle=10.0))
    target = Target("f", 1, "1" * 64, "/nonexistent", spec)
    try:
        pool.retire_all_but([target.key])
        rp = pool.open_revision(target)
        rp.backoff_until = math.inf  # no zygote here: no pre-warm or start is tried
        inst = _idle_instance("f-1-abc")
        rp.instances[inst.id] = inst
        stepped: list[float] = []
        autoscale = rp.autoscale

        def counted(now: float, step: float) -> object:
            stepped.append(now)
            return autoscale(now, step)

        rp.autoscale = counted  # type: ignore[method-assign]
        t0 = time.monotonic()
        rp.demand = 1  # a request runs (as RevisionPool.invoke reports it)
        pool.activity(target, busy=True, now=t0)
        pool.tick(t0)
        rp.demand = 0
        pool.activity(target, busy=False, now=t0 + 0.1)
        ticks = [t0 + manager.TICK * n for n in range(1, 42)]
        for now in ticks[:-2]:
            pool.tick(now)
            assert not inst.dead  # kept within the grace
        # Busy, then the step after the request: from there nothing until the grace ends.
        assert stepped == [t0, ticks[0]]
        assert pool.due.when(target.key) == t0 + 10.0
        for now in ticks[-2:]:
            pool.tick(now)
        assert stepped[:3] == [t0, ticks[0], ticks[-2]]  # ticks[-2]: the grace's end
        assert inst.dead  # the grace is over: scaled to zero, as before
    finally:
        pool.placement.shutdown()


def test_a_revision_at_rest_is_woken_by_a_request(tmp_path: Path) -> None:
    """Sleeping through the grace does not make a revision deaf: a request steps it at the
    next tick, and the autoscaler sees the samples it slept through as zeros."""
    asyncio.run(_woken_by_a_request(tmp_path))


async def _woken_by_a_request(tmp_path: Path) -> None:
    pool = Pool(ServerConfig(home=tmp_path), TelemetryBuffer(1024))
    spec = FunctionSpec(name="g", scale=ScaleSpec(idle=10.0))
    target = Target("g", 1, "2" * 64, "/nonexistent", spec)
    try:
        pool.retire_all_but([target.key])
        rp = pool.open_revision(target)
        rp.backoff_until = math.inf
        inst = _idle_instance("g-1-abc")
        rp.instances[inst.id] = inst
        t0 = time.monotonic()
        rp.demand = 1
        pool.activity(target, busy=True, now=t0)
        pool.tick(t0)
        rp.demand = 0
        pool.activity(target, busy=False, now=t0 + 0.1)
        pool.tick(t0 + 0.25)
        assert rp.asleep and pool.due.when(target.key) == t0 + 10.0
        pool.activity(target, busy=True, now=t0 + 5.0)  # a request, half-way through
        assert pool.due.when(target.key) is not None and pool.due.when(target.key) <= t0 + 5.0
        rp.demand = 1
        pool.tick(t0 + 5.0)
        assert not rp.asleep
        # zero samples for the time it slept, about one per STEP, within the stable window
        assert len(rp.window.samples) >= 5.0 / manager.STEP - 2
    finally:
        pool.placement.shutdown()


def test_instance_counts_match_the_statistics_without_building_them(tmp_path: Path) -> None:
    """/metrics reads `instance_counts()` on the event loop (a RevisionStats per revision
    took 9-22 ms a scrape at 1,000 revisions); they say what `statistics()` says."""
    asyncio.run(_counts(tmp_path))


async def _counts(tmp_path: Path) -> None:
    pool = Pool(ServerConfig(home=tmp_path), TelemetryBuffer(1024))
    try:
        targets = [
            Target(f"c{i}", 1, f"{i:064d}", "/nonexistent", FunctionSpec(name=f"c{i}"))
            for i in range(3)
        ]
        pool.retire_all_but([t.key for t in targets])
        pools = [pool.open_revision(t) for t in targets]
        for n, rp in enumerate(pools):
            for k in range(n + 1):
                inst = _idle_instance(f"{rp.target.function}-1-{k}")
                rp.instances[inst.id] = inst
        pools[1].instances["c1-1-0"].reserved += 1  # promised to a request: busy
        pools[2].starting = 2
        expected = [(s.function, s.idle, s.busy, s.starting, s.waiting) for s in pool.statistics()]
        assert [tuple(c) for c in pool.instance_counts()] == expected
        assert expected[1][1:3] == (1, 1) and expected[2][3] == 2
    finally:
        pool.placement.shutdown()


def test_serving_some_functions_leaves_the_pool_as_serving_all(tmp_path: Path) -> None:
    """A deploy's publish tells the pool about its function only (`serve_functions`; the full
    `serve` walked every revision per deploy): both leave every revision retired, standby or
    serving alike, through a deploy, a canary, an alias without traffic and a removal."""
    asyncio.run(_serving_some(tmp_path))


def _t(name: str, number: int) -> Target:
    return Target(
        name, number, f"{number}{name}".rjust(64, "0"), "/nonexistent", FunctionSpec(name=name)
    )


async def _serving_some(tmp_path: Path) -> None:
    some = Pool(ServerConfig(home=tmp_path / "some"), TelemetryBuffer(1024))
    every = Pool(ServerConfig(home=tmp_path / "every"), TelemetryBuffer(1024))
    try:
        routes = {f"default/f{i}": ([_t(f"f{i}", 1)], [_t(f"f{i}", 1)]) for i in range(5)}

        def publish(changed: dict[str, tuple[list[Target], list[Target]]]) -> None:
            routes.update(changed)
            some.serve_functions(changed)
            every.serve(
                [t for serving, _ in routes.values() for t in serving],
                [t for _, targets in routes.values() for t in targets],
            )
            for target in [t for _, targets in routes.values() for t in targets]:
                some.open_revision(target)
                every.open_revision(target)
            flags = {k: (rp.retired, rp.standby) for k, rp in some.revisions.items()}
            assert flags == {k: (rp.retired, rp.standby) for k, rp in every.revisions.items()}

        publish(dict(routes))
        publish({"default/f1": ([_t("f1", 2)], [_t("f1", 2)])})  # deployed again
        assert some.revisions[_t("f1", 1).key].retired
        both = [_t("f2", 1), _t("f2", 2)]
        publish({"default/f2": (both, both)})  # a canary: both serve
        publish({"default/f3": ([], [])})  # removed
        assert some.revisions[_t("f3", 1).key].retired
        publish({"default/f4": ([_t("f4", 1)], [_t("f4", 1), _t("f4", 2)])})  # alias, no weight
        assert some.revisions[_t("f4", 2).key].standby
        assert not some.revisions[_t("f4", 2).key].retired
    finally:
        some.placement.shutdown()
        every.placement.shutdown()
