"""The pool on its own, with a real root zygote, function zygote and instances (no HTTP)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from ember.autoscaler.histogram import IdleHistogram
from ember.cli.main import PASSED_ENV
from ember.config import ServerConfig
from ember.errors import EmberError
from ember.pool import manager
from ember.pool.manager import Pool
from ember.pool.target import Target
from ember.spec import FunctionSpec, ScaleSpec
from ember.telemetry.buffer import TelemetryBuffer
from ember.wire.messages import Invoke
from tests.integration.conftest import GATED, Gate

CODE = (
    GATED
    + """
def handle(req, ctx):
    gate(req)
    return {"pid": os.getpid()}
"""
)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `predicate` on the event loop (the pool's work goes on meanwhile) until a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def invoke(i: int, gate: Gate | None = None) -> Invoke:
    query = f"gate={gate.port}".encode() if gate is not None else b""
    return Invoke(id=f"r{i}", method="GET", path="/", query=query, headers=[], body=b"", deadline=0)


def test_requests_arriving_together_never_exceed_scale_max(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.py").write_text(CODE)
    spec = FunctionSpec(name="capped", scale=ScaleSpec(max=2))
    target = Target(function="capped", number=1, sha256="x" * 64, code_dir=str(code), spec=spec)

    async def main() -> set[int]:
        env = {k: v for k, v in os.environ.items() if k in PASSED_ENV}
        config = ServerConfig(home=tmp_path / "home", use_cgroups=False, base_env=env)
        pool = Pool(config, TelemetryBuffer(1024))
        await pool.start()
        try:
            await pool.prepare(target)
            pool.retire_all_but([target.key])
            rp = pool.open_revision(target)
            loop = asyncio.get_running_loop()
            with Gate() as gate:
                calls = asyncio.gather(  # all in one loop turn
                    *(rp.invoke(invoke(i, gate), loop.time() + 30) for i in range(8))
                )
                await until(lambda: gate.held() == 2, "both instances to run a request")
                stats = rp.statistics()
                assert (stats.busy, stats.starting, stats.waiting) == (2, 0, 6), stats
                gate.open()
                results = await calls
            assert len(rp.instances) == 2
            return {json.loads(r.body)["pid"] for r, _tier, _inst in results}
        finally:
            await pool.shutdown()

    pids = asyncio.run(main())
    assert len(pids) == 2


def test_zygote_keepalive_follows_the_idle_histogram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A function whose idle times are all ~2 s: after its activity the zygote is released at
    once, loaded again before the next request is due, and released past the tail. The test
    steps the keep-alive's clock itself (the pool's own loop is kept from ticking)."""
    monkeypatch.setattr(manager, "TICK", 3600.0)
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.py").write_text(CODE)
    spec = FunctionSpec(name="periodic", scale=ScaleSpec(idle=0.2))
    target = Target(function="periodic", number=1, sha256="p" * 64, code_dir=str(code), spec=spec)

    async def main() -> None:
        env = {k: v for k, v in os.environ.items() if k in PASSED_ENV}
        config = ServerConfig(
            home=tmp_path / "home", use_cgroups=False, base_env=env, zygote_keepalive=0.3
        )  # what the deploy warmed is kept only that long
        pool = Pool(config, TelemetryBuffer(1024))
        await pool.start()
        try:
            await pool.prepare(target)
            pool.retire_all_but([target.key])
            hist = pool.activity_of.histograms[target.qualified] = IdleHistogram(
                bins=240, bin_s=0.5
            )
            for _ in range(20):
                hist.record(2.0)  # learned: the next request comes ~2 s after the last
            windows = pool.keepalive_windows(target.qualified)
            assert (windows.prewarm, windows.keepalive) == (1.0, 2.0), windows
            rp = pool.open_revision(target)
            loop = asyncio.get_running_loop()
            await rp.invoke(invoke(0), loop.time() + 30)
            ended = time.monotonic()

            def settled() -> bool:  # stopped instances gone, a zygote started is ready
                loading = rp.zygote_alive and (rp.zygote is None or not rp.zygote.ready.done())
                return not loading and not any(i.dead for i in rp.instances.values())

            async def alive_after(seconds: float) -> bool:
                """A keep-alive step `seconds` past the activity: whether a zygote is loaded."""
                pool.tick(ended + seconds)
                await asyncio.sleep(0)  # what the step started takes its first step
                await until(settled, "what the step started or stopped")
                return rp.zygote_alive

            # Its instance goes after scale.idle (0.2 s past the last step that saw the request)
            # and the zygote right after it; it is loaded again from 1 s, for the request
            # expected at ~2 s, and released past the tail (1 + 2 s).
            expected = {0.25: True, 0.5: True, 0.75: False, 0.95: False, 1.05: True, 1.5: True}
            expected |= {2.0: True, 2.5: True, 2.95: True, 3.05: False, 3.5: False, 4.0: False}
            seen = {t: await alive_after(t) for t in expected}
            assert seen == expected
        finally:
            await pool.shutdown()

    asyncio.run(main())


def test_starts_waiting_for_memory_stay_within_scale_max(tmp_path: Path) -> None:
    """Requests that wait for the node's memory hold their place within scale.max: when the
    memory comes back, the revision still has at most scale.max instances."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.py").write_text(CODE)

    def target(name: str, scale_max: int) -> Target:
        spec = FunctionSpec(name=name, memory=128, scale=ScaleSpec(max=scale_max))
        return Target(function=name, number=1, sha256=name[0] * 64, code_dir=str(code), spec=spec)

    alpha, beta = target("alpha", 2), target("beta", 1)

    async def main() -> None:
        env = {k: v for k, v in os.environ.items() if k in PASSED_ENV}
        config = ServerConfig(
            home=tmp_path / "home",
            use_cgroups=False,
            base_env=env,
            memory_budget_mb=300,  # two instances at their cap and two zygotes at rest
            budget_wait=30,
        )
        pool = Pool(config, TelemetryBuffer(1024))
        pool.settings = msgspec.structs.replace(pool.settings, spare_instances=False)
        await pool.start()
        try:
            await pool.prepare(alpha)
            await pool.prepare(beta)
            pool.retire_all_but([alpha.key, beta.key])
            a, b = pool.open_revision(alpha), pool.open_revision(beta)
            # The zygotes count what they use (a few MB), not 128 MB each, once measured.
            await until(lambda: pool.budget.used_mb() < 44, "both zygotes measured at rest")
            deadline = asyncio.get_running_loop().time() + 30
            with Gate() as gate:
                calls = [asyncio.ensure_future(a.invoke(invoke(0, gate), deadline))]
                doomed = asyncio.ensure_future(b.invoke(invoke(100, gate), deadline))
                await until(lambda: gate.held() == 2, "one instance of each: the budget spent")
                calls += [
                    asyncio.ensure_future(a.invoke(invoke(i, gate), deadline)) for i in range(1, 7)
                ]
                await until(lambda: a.statistics().starting == 1, "a start waiting for memory")
                stats = a.statistics()
                assert (stats.busy, stats.starting, stats.waiting) == (1, 1, 5), stats
                pool.discard(beta)  # its memory comes back
                await until(lambda: a.statistics().busy == 2, "the waiting start to run")
                stats = a.statistics()
                assert (stats.busy, stats.starting, stats.waiting) == (2, 0, 5), stats
                gate.open()
                results = await asyncio.gather(*calls)
                with pytest.raises(EmberError):  # beta was discarded under its request
                    await doomed
            assert len({json.loads(r.body)["pid"] for r, _tier, _inst in results}) == 2
            starts = {"warm": 5, "spare": 0, "fork": 2, "specialize": 0, "fresh": 0}
            assert a.statistics().starts == starts
        finally:
            await pool.shutdown()

    asyncio.run(main())


def test_functions_at_rest_count_what_they_use_so_many_stay_warm(tmp_path: Path) -> None:
    """The budget counts what is at rest at its measured use: eight functions of memory: 128,
    each called once, all keep their zygote and idle instance in a 500 MB budget that,
    counting each process at its setting, holds fewer than four of their sixteen processes."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.py").write_text(CODE)
    targets = [
        Target(
            function=f"f{i}",
            number=1,
            sha256=f"{i}" * 64,
            code_dir=str(code),
            spec=FunctionSpec(name=f"f{i}", memory=128),
        )
        for i in range(8)
    ]

    async def main() -> None:
        env = {k: v for k, v in os.environ.items() if k in PASSED_ENV}
        config = ServerConfig(
            home=tmp_path / "home", use_cgroups=False, base_env=env, memory_budget_mb=500
        )
        pool = Pool(config, TelemetryBuffer(1024))
        await pool.start()
        try:
            pool.retire_all_but([t.key for t in targets])
            loop = asyncio.get_running_loop()
            for n, target in enumerate(targets):
                await pool.prepare(target)
                _result, tier, _inst = await pool.open_revision(target).invoke(
                    invoke(n), loop.time() + 30
                )
                assert tier == "fork"
                # At rest its zygote and idle instance are measured: a few MB, not 2 x 128.
                await until(lambda: pool.budget.used_mb() <= 30 * (n + 1), "the measurement")  # noqa: B023
            stats = [pool.open_revision(t).statistics() for t in targets]
            assert [(s.zygote, s.idle) for s in stats] == [("ready", 1)] * len(targets), stats
            assert pool.node_statistics().memory_used_mb <= 30 * len(targets)
            # A second pass of warm requests: each instance served since it was measured and
            # counts its measurement plus its peak RSS's growth (none), not its 128 MB cap.
            for n, target in enumerate(targets):
                _result, tier, _inst = await pool.open_revision(target).invoke(
                    invoke(100 + n), loop.time() + 30
                )
                assert tier == "warm"
            assert pool.node_statistics().memory_used_mb <= 30 * len(targets)
        finally:
            await pool.shutdown()

    asyncio.run(main())
