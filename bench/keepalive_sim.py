"""Zygote keep-alive: a fixed 10 minutes vs the hybrid histogram policy, on a replayed trace.

No server: a seeded synthetic trace of 24 simulated hours is replayed through the policies'
pure functions. Functions are timers (every 5 min to 2 h, fired up to 3 s late), bursty
(Poisson bursts of 5-40 calls a few seconds apart, hours apart), rare (2-6 calls a day at
random) and frequent (every 1-10 s); each call runs 100 ms. A function's zygote is loaded while
it runs and as its policy says between runs; a call that finds it unloaded is a cold start.
Memory is the zygote's size times the time it is loaded, until the end of the trace.

`fixed` keeps the zygote 600 s after each end of activity. `hybrid` learns online: at each end
of activity it takes `windows()` of the idle times seen so far (fallback 600 s), and records
the idle time that follows only after judging it.

python -m bench.keepalive_sim [--quick] [--seed N]
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from bench.common import Row, log, report
from ember.autoscaler.histogram import IdleHistogram, Windows, loaded, windows

FIXED_KEEPALIVE = 600.0
DURATION = 0.1
HOUR = 3600.0
KINDS = ("periodic", "bursty", "rare", "frequent")

Policy = Callable[[IdleHistogram], Windows]

POLICIES: dict[str, Policy] = {
    "fixed": lambda _: Windows(0.0, FIXED_KEEPALIVE, representative=False, reason="fixed"),
    "hybrid": lambda hist: windows(hist, FIXED_KEEPALIVE),
}


class Fn(msgspec.Struct, frozen=True):
    name: str
    kind: str
    memory_mb: int
    arrivals: list[float]


class Outcome(msgspec.Struct, frozen=True):
    invocations: int
    cold: int
    loaded_s: float
    last: Windows | None  # the windows after the last end of activity


def periodic(rng: random.Random, period: float, horizon: float) -> list[float]:
    t = rng.uniform(0, period)
    out = []
    while t < horizon:
        out.append(t + rng.uniform(0, 3.0))
        t += period
    return out


def bursty(rng: random.Random, mean_gap: float, horizon: float) -> list[float]:
    out = []
    t = rng.expovariate(1 / mean_gap)
    while t < horizon:
        for _ in range(rng.randint(5, 40)):
            t += rng.expovariate(1 / 3.0)
            out.append(t)
        t += rng.expovariate(1 / mean_gap)
    return [a for a in out if a < horizon]


def rare(rng: random.Random, horizon: float) -> list[float]:
    calls = (rng.uniform(0, 24 * HOUR) for _ in range(rng.randint(2, 6)))
    return sorted(t for t in calls if t < horizon)


def frequent(rng: random.Random, horizon: float) -> list[float]:
    out = []
    t = rng.uniform(1, 10)
    while t < horizon:
        out.append(t)
        t += rng.uniform(1, 10)
    return out


def trace(seed: int, horizon: float) -> list[Fn]:
    """The synthetic functions, their memory and their call times, from one seed."""
    rng = random.Random(seed)

    def fn(name: str, kind: str, arrivals: list[float]) -> Fn:
        return Fn(name, kind, rng.choice((128, 256, 512)), arrivals)

    fns = [fn(f"timer-{m}m", "periodic", periodic(rng, m * 60.0, horizon)) for m in (5, 10, 15)]
    fns += [fn(f"timer-{m}m", "periodic", periodic(rng, m * 60.0, horizon)) for m in (30, 60, 120)]
    fns += [fn(f"burst-{h}h", "bursty", bursty(rng, h * HOUR, horizon)) for h in (1, 2, 4, 8)]
    fns += [fn(f"rare-{i}", "rare", rare(rng, horizon)) for i in range(6)]
    fns += [fn(f"frequent-{i}", "frequent", frequent(rng, horizon)) for i in range(2)]
    return fns


def _loaded_for(w: Windows, idle: float) -> float:
    """Seconds of an idle gap of `idle` seconds during which the zygote is loaded."""
    return max(0.0, min(idle, w.prewarm + w.keepalive) - w.prewarm)


def simulate(arrivals: Sequence[float], policy: Policy, horizon: float) -> Outcome:
    """Replay one function's calls under one policy."""
    hist = IdleHistogram()
    cold, loaded_s = 0, 0.0
    w: Windows | None = None
    start = end = -math.inf  # the current activity
    for t in arrivals:
        if t < end:
            end = max(end, t + DURATION)
            continue
        if w is None:
            cold += 1
        else:
            idle = t - end
            cold += not loaded(w, idle)
            loaded_s += (end - start) + _loaded_for(w, idle)
            hist.record(idle)
        start, end = t, t + DURATION
        w = policy(hist)
    if w is not None:
        loaded_s += (end - start) + _loaded_for(w, max(0.0, horizon - end))
    return Outcome(len(arrivals), cold, loaded_s, w)


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else math.nan


def _row(label: str, fns: int, got: dict[str, list[tuple[Fn, Outcome]]]) -> Row:
    calls = sum(o.invocations for _, o in got["fixed"])
    cold = {p: sum(o.cold for _, o in got[p]) for p in POLICIES}
    gb_s = {p: sum(f.memory_mb / 1024 * o.loaded_s for f, o in got[p]) for p in POLICIES}
    return {
        "class": label,
        "fns": fns,
        "calls": calls,
        "cold_fixed": cold["fixed"],
        "cold_hybrid": cold["hybrid"],
        "cold%_fixed": round(100 * cold["fixed"] / calls, 2) if calls else math.nan,
        "cold%_hybrid": round(100 * cold["hybrid"] / calls, 2) if calls else math.nan,
        "cold_ratio": _ratio(cold["hybrid"], cold["fixed"]),
        "gb_s_fixed": round(gb_s["fixed"], 1),
        "gb_s_hybrid": round(gb_s["hybrid"], 1),
        "mem_ratio": _ratio(gb_s["hybrid"], gb_s["fixed"]),
    }


def _function_row(fn: Fn, fixed: Outcome, hybrid: Outcome) -> Row:
    return {
        "function": fn.name,
        "memory_mb": fn.memory_mb,
        "calls": fixed.invocations,
        "cold_fixed": fixed.cold,
        "cold_hybrid": hybrid.cold,
        "loaded_s_fixed": round(fixed.loaded_s, 1),
        "loaded_s_hybrid": round(hybrid.loaded_s, 1),
        "hybrid_windows": msgspec.to_builtins(hybrid.last),
    }


def run(scale: float = 1.0, seed: int = 1) -> dict[str, Any]:
    horizon = 24 * HOUR * scale
    fns = trace(seed, horizon)
    log(f"keepalive_sim: {len(fns)} functions over {horizon / HOUR:g} simulated hours")
    results = {
        p: [(f, simulate(f.arrivals, policy, horizon)) for f in fns]
        for p, policy in POLICIES.items()
    }
    rows = []
    for kind in KINDS:
        got = {p: [(f, o) for f, o in results[p] if f.kind == kind] for p in POLICIES}
        rows.append(_row(kind, len(got["fixed"]), got))
    rows.append(_row("total", len(fns), results))
    per_fn = [
        _function_row(f, fixed, hybrid)
        for (f, fixed), (_, hybrid) in zip(results["fixed"], results["hybrid"], strict=True)
    ]
    return report(
        "keepalive_sim",
        rows,
        seed=seed,
        hours=horizon / HOUR,
        fixed_keepalive_s=FIXED_KEEPALIVE,
        functions=per_fn,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.keepalive_sim", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="6 simulated hours instead of 24")
    parser.add_argument("--seed", type=int, default=1, help="trace seed")
    args = parser.parse_args()
    run(0.25 if args.quick else 1.0, args.seed)
