"""The pool on its own, with a real root zygote, function zygote and instances (no HTTP)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from ember.autoscaler.histogram import IdleHistogram
from ember.cli.main import PASSED_ENV
from ember.config import ServerConfig
from ember.pool.manager import Pool
from ember.pool.target import Target
from ember.spec import FunctionSpec, ScaleSpec
from ember.telemetry.buffer import TelemetryBuffer
from ember.wire.messages import Invoke

CODE = """import os, time
def handle(req, ctx):
    time.sleep(0.05)
    return {"pid": os.getpid()}
"""


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
            calls = [
                rp.invoke(
                    Invoke(
                        id=f"r{i}",
                        method="GET",
                        path="/",
                        query=b"",
                        headers=[],
                        body=b"",
                        deadline=time.time() + 30,
                    ),
                    loop.time() + 30,
                )
                for i in range(8)
            ]
            results = await asyncio.gather(*calls)  # all in one loop turn
            assert len(rp.instances) <= 2
            return {json.loads(r.body)["pid"] for r, _tier, _inst in results}
        finally:
            await pool.shutdown()

    pids = asyncio.run(main())
    assert 1 <= len(pids) <= 2


def test_zygote_keepalive_follows_the_idle_histogram(tmp_path: Path) -> None:
    """A function whose idle times are all ~2 s: after its activity the zygote is released at
    once, loaded again before the next request is due, and released past the tail."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.py").write_text(CODE)
    spec = FunctionSpec(name="periodic", scale=ScaleSpec(idle=0.2))
    target = Target(function="periodic", number=1, sha256="p" * 64, code_dir=str(code), spec=spec)

    async def main() -> list[tuple[float, bool]]:
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
            msg = Invoke(
                id="r", method="GET", path="/", query=b"", headers=[], body=b"", deadline=0
            )
            await rp.invoke(msg, loop.time() + 30)
            ended = time.monotonic()
            seen = []
            while time.monotonic() - ended < 4.0:
                await asyncio.sleep(0.05)
                seen.append((time.monotonic() - ended, rp.zygote_alive))
            return seen
        finally:
            await pool.shutdown()

    seen = asyncio.run(main())
    alive = lambda lo, hi: {z for t, z in seen if lo <= t < hi}  # noqa: E731
    assert alive(0.6, 0.9) == {False}  # released right after activity (instances went at 0.2)
    assert alive(1.3, 2.9) == {True}  # pre-warmed from 1 s, for the expected request at ~2 s
    assert alive(3.4, 4.0) == {False}  # released past the tail (1 + 2 s)


def test_starts_waiting_for_memory_stay_within_scale_max(tmp_path: Path) -> None:
    """Requests that wait for the node's memory hold their place within scale.max: when the
    memory comes back, the revision still has at most scale.max instances."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.py").write_text("import time\ndef handle(req, ctx):\n    time.sleep(1)\n")

    def target(name: str, scale_max: int) -> Target:
        spec = FunctionSpec(name=name, memory=128, scale=ScaleSpec(max=scale_max))
        return Target(function=name, number=1, sha256=name[0] * 64, code_dir=str(code), spec=spec)

    alpha, beta = target("alpha", 2), target("beta", 1)

    def invoke(i: int) -> Invoke:
        return Invoke(
            id=f"r{i}", method="GET", path="/", query=b"", headers=[], body=b"", deadline=0
        )

    async def main() -> tuple[int, int]:
        env = {k: v for k, v in os.environ.items() if k in PASSED_ENV}
        config = ServerConfig(
            home=tmp_path / "home",
            use_cgroups=False,
            base_env=env,
            memory_budget_mb=512,  # two zygotes and two instances
            budget_wait=5,
        )
        pool = Pool(config, TelemetryBuffer(1024))
        await pool.start()
        try:
            await pool.prepare(alpha)
            await pool.prepare(beta)
            pool.retire_all_but([alpha.key, beta.key])
            a, b = pool.open_revision(alpha), pool.open_revision(beta)
            loop = asyncio.get_running_loop()
            calls = [asyncio.ensure_future(a.invoke(invoke(0), loop.time() + 30))]
            calls.append(asyncio.ensure_future(b.invoke(invoke(100), loop.time() + 30)))
            await asyncio.sleep(0.3)  # the budget is spent
            calls += [
                asyncio.ensure_future(a.invoke(invoke(i), loop.time() + 30)) for i in range(6)
            ]
            await asyncio.sleep(0.3)
            pool.discard(beta)  # its memory comes back
            peak = 0
            for _ in range(40):
                await asyncio.sleep(0.05)
                peak = max(peak, a.count)
            results = await asyncio.gather(*calls, return_exceptions=True)
            return peak, sum(1 for r in results if not isinstance(r, BaseException))
        finally:
            await pool.shutdown()

    peak, served = asyncio.run(main())
    assert peak <= 2
    assert served >= 2
