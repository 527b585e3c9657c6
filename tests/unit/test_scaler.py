"""The concurrency autoscaler, table-driven on a fake clock.

Each scenario replays a load (concurrency as a function of time) through the same loop the
pool runs: one sample per 0.25 s tick, `decide`, and the instances follow the decision.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest

from ember.autoscaler.scaler import Window, decide
from ember.spec import ScaleSpec

TICK = 0.25
Load = Callable[[float], float]


def replay(scale: ScaleSpec, load: Load, seconds: float, start: int = 0) -> list[tuple[float, int]]:
    """(time, instances) after each tick; instances follow the decision at once."""
    window = Window(scale.window)
    instances, out = start, []
    for i in range(1, int(seconds / TICK) + 1):
        now = i * TICK
        concurrency = load(now)
        window.add(now, concurrency, instances, active=concurrency > 0)
        decision = decide(scale, 1, window, now)
        window.keep(decision)
        instances = decision.desired
        out.append((now, instances))
    return out


def at(trace: list[tuple[float, int]], t: float) -> int:
    return next(n for now, n in trace if now >= t)


def changes(trace: list[tuple[float, int]], after: float = 0.0) -> int:
    counts = [n for now, n in trace if now >= after]
    return sum(1 for a, b in itertools.pairwise(counts) if a != b)


def steady(level: float) -> Load:
    return lambda t: level


def test_steady_load_settles_on_ceil_of_load_over_target() -> None:
    trace = replay(ScaleSpec(max=50), steady(7.0), 120)
    assert at(trace, 5) == 7
    assert changes(trace, after=5) == 0
    trace = replay(ScaleSpec(max=50, target=2.0), steady(7.0), 120)
    assert at(trace, 60) == 4  # ceil(7 / 2)


def test_burst_panics_up_at_once_and_holds_through_the_window() -> None:
    def burst(t: float) -> float:
        return 40.0 if 30 <= t < 40 else 2.0

    scale = ScaleSpec(max=100)
    window = Window(scale.window)
    instances, panics = 0, []
    for i in range(1, 200 * 4):
        now = i * TICK
        window.add(now, burst(now), instances, active=True)
        decision = decide(scale, 1, window, now)
        window.keep(decision)
        instances = decision.desired
        panics.append((now, decision.panic, instances))
    # within a second of the burst the short window already asks for many times more
    at_31 = next(n for now, _p, n in panics if now >= 31)
    assert at_31 >= 6
    during = [n for now, _p, n in panics if 39 <= now < 40]
    assert max(during) >= 35  # the panic window's mean approaches 40
    # no scale-down while panicking: monotone from the burst until the panic ends
    panicking = [(now, n) for now, p, n in panics if p and now >= 30]
    counts = [n for _now, n in panicking]
    assert counts == sorted(counts)
    # it lasts a stable window past the last time the short window asked for 2x
    assert 30 + scale.window - 1 <= panicking[-1][0] <= 40 + scale.window
    # and then it comes back down towards the steady 2, step by step, never below
    end = [n for now, _p, n in panics if now >= 195]
    assert 2 <= end[-1] <= 4


def test_drop_to_zero_waits_for_the_idle_grace_then_scales_to_zero() -> None:
    def load(t: float) -> float:
        return 5.0 if t < 30 else 0.0

    scale = ScaleSpec(max=10, idle=60, window=60)
    trace = replay(scale, load, 200)
    assert at(trace, 29) == 5
    assert at(trace, 60) >= 1  # still within the window: the mean is not zero yet
    assert at(trace, 85) == 1  # the window is empty of load but the grace is not over
    assert at(trace, 91) == 0  # 60 s after the last request
    # scaled down gradually: never more than halving per step
    counts = [n for now, n in trace if 30 <= now < 91]
    for a, b in itertools.pairwise(counts):
        assert b >= math.ceil(a / 2) or b == 0


def test_short_idle_grace_scales_to_zero_before_the_window_forgets() -> None:
    scale = ScaleSpec(max=10, idle=5, window=20, panic_window=2)
    trace = replay(scale, lambda t: 3.0 if t < 10 else 0.0, 60)
    assert at(trace, 14.5) >= 1
    assert at(trace, 15.25) == 0


@pytest.mark.parametrize(("period", "most"), [(2.0, 0), (5.0, 0), (10.0, 8), (30.0, 8)])
def test_oscillating_load_does_not_flap(period: float, most: int) -> None:
    """On/off load: the stable mean sits at 5. Fast oscillation changes nothing; slow on-phases
    (10 s, 30 s) trigger a panic to 10 that holds a whole window: at most one rise and one
    fall per stable window, never following the load's own period."""

    def load(t: float) -> float:
        return 10.0 if int(t / period) % 2 == 0 else 0.0

    trace = replay(ScaleSpec(max=50), load, 300)
    steps = [(now, b - a) for (_t, a), (now, b) in itertools.pairwise(trace) if a != b]
    steps = [(now, d) for now, d in steps if now >= 90]
    turns = [now for (_t, d1), (now, d2) in itertools.pairwise(steps) if d1 * d2 < 0]
    if most == 0:
        assert steps == []
    assert len(turns) <= most  # at most a rise and a fall per stable window
    assert all(b - a >= 10.0 for a, b in itertools.pairwise(turns))  # no flap
    assert all(5 <= n <= 10 for now, n in trace if now >= 90)


@pytest.mark.parametrize(
    ("scale", "level", "expected"),
    [
        (ScaleSpec(min=3, max=10), 0.0, 3),
        (ScaleSpec(min=3, max=10), 1.0, 3),
        (ScaleSpec(min=0, max=4), 20.0, 4),
        (ScaleSpec(min=2, max=2), 9.0, 2),
    ],
)
def test_min_and_max_clamp(scale: ScaleSpec, level: float, expected: int) -> None:
    trace = replay(scale, steady(level), 200)
    assert at(trace, 150) == expected
    assert all(scale.min <= n <= scale.max for _now, n in trace)


def test_scale_down_is_rate_limited() -> None:
    scale = ScaleSpec(max=64, window=6, panic_window=1, idle=600)
    trace = replay(scale, lambda t: 64.0 if t < 20 else 1.0, 60, start=0)
    assert at(trace, 19) == 64
    steps = [n for now, n in trace if now >= 20]
    for a, b in itertools.pairwise(steps):
        assert b >= math.ceil(a / scale.down_rate)
    downs = [now for (now, a), (_t, b) in itertools.pairwise(trace) if b < a]
    assert all(b - a >= 2.0 - 1e-9 for a, b in itertools.pairwise(downs))
    assert at(trace, 59) == 1


def test_a_manual_scale_holds_for_the_idle_grace() -> None:
    scale = ScaleSpec(max=10, idle=30)
    window = Window(scale.window)
    window.held, window.held_until = 5, 30.0
    for i in range(1, 50 * 4):
        now = i * TICK
        window.add(now, 0.0, 5, active=False)
        decision = decide(scale, 1, window, now)
        window.keep(decision)
        assert decision.desired == (5 if now < 30 else 0)


def test_a_manual_scale_to_zero_is_a_hold_not_a_floor() -> None:
    """Regression: `ember scale N` only raised the floor; after `--instances 0` the window's
    remembered load brought an instance back within a tick."""
    scale = ScaleSpec(max=10, idle=30)
    window = Window(scale.window)
    for i in range(1, 41):  # 10 s of steady load at 3 requests in flight
        now = i * TICK
        window.add(now, 3.0, 3, active=True)
        window.keep(decide(scale, 1, window, now))
    window.held, window.held_until = 0, 10.0 + 30.0
    instances = 0
    for i in range(41, 41 + 4 * 35):  # load stops; the hold runs to 40 s, the grace to 40 s
        now = i * TICK
        window.add(now, 0.0, instances, active=False)
        decision = decide(scale, 1, window, now)
        window.keep(decision)
        instances = decision.desired
        assert instances == 0, f"{instances} at {now}"


def test_a_manual_scale_down_holds_below_what_the_window_remembers() -> None:
    scale = ScaleSpec(max=10, idle=30)
    window = Window(scale.window)
    instances = 0

    def tick(i: int) -> int:
        now = i * TICK
        window.add(now, 6.0, instances, active=True)
        decision = decide(scale, 1, window, now)
        window.keep(decision)
        return decision.desired

    for i in range(1, 41):
        instances = tick(i)
    assert instances == 6
    window.held, window.held_until = 2, 10.0 + 30.0
    for i in range(41, 81):  # the load goes on: the hold still says 2 (requests start their own)
        instances = tick(i)
        assert instances == 2


def test_a_window_that_slept_gets_the_zero_samples_its_skipped_ticks_would_have_taken() -> None:
    """The pool stops stepping a revision with nothing to decide; when it steps it again, the
    window must say what a window sampled every tick would (else old load, never diluted by
    the idle time, would look current)."""
    scale = ScaleSpec(max=50, window=60.0, idle=1.0)
    ticked, slept = Window(scale.window), Window(scale.window)
    for i in range(1, 41):  # 10 s of load 8 on both
        ticked.add(i * TICK, 8.0, 8, active=True)
        slept.add(i * TICK, 8.0, 8, active=True)
    for i in range(41, 41 + 80):  # 20 s idle: one window sampled every tick, the other asleep
        ticked.add(i * TICK, 0.0, 0, active=False)
    now = 120 * TICK
    slept.idle_until(now, TICK)
    slept.add(now, 0.0, 0, active=False)
    assert list(slept.samples) == list(ticked.samples)
    assert decide(scale, 1, slept, now + 5) == decide(scale, 1, ticked, now + 5)


def test_a_window_asleep_longer_than_its_span_keeps_at_most_a_span_of_zeros() -> None:
    window = Window(6.0)
    window.add(1.0, 5.0, 5, active=True)
    window.idle_until(1000.0, TICK)
    window.add(1000.0, 0.0, 0, active=False)
    assert len(window.samples) == 24 and window.mean(1000.0, 6.0) == 0.0


def test_a_burst_that_first_shows_in_part_of_a_tick_still_panics() -> None:
    """Regression (a flaky integration test): seven clients joined one just before a tick, so
    that tick saw a little more than one; requests had started eight instances themselves, so
    the scaler's 'fewer than running' took the rate-limited scale-down path, which holds what
    runs and made that its previous decision: the next ticks, at load eight, never looked
    like twice what it had provided, and the burst never panicked."""
    scale = ScaleSpec(max=20, window=6.0, panic_window=1.0, idle=2.0)
    window = Window(scale.window)
    now = 0.0
    decision = None
    for load, instances in [(0.93, 1)] * 30 + [(1.2, 8)] + [(8.0, 8)] * 3:
        now += TICK
        window.add(now, load, instances, active=True)
        decision = decide(scale, 1, window, now)
        window.keep(decision)
    assert decision is not None and decision.panic and decision.desired >= 8
