"""`rollout.step()`: one decision of a gradual rollout, as a table."""

from __future__ import annotations

import pytest

from ember.api.rollout import MIN_REQUESTS, Verdict, step
from ember.store.base import Rollout
from ember.telemetry.outcomes import MAX_SAMPLES, Outcomes, Summary

BASE = Rollout(
    from_revision=3,
    to_revision=4,
    weight=10,
    step=30,
    every=60.0,
    max_error_rate=0.01,
    max_p99_ms=500.0,
    started_at=0.0,
    next_at=60.0,
)

CASES = [
    ("mid-step, healthy: wait", BASE, Summary(50, 0, 20.0), 30.0, Verdict.WAIT, 10, "running"),
    (
        "mid-step, failing: back at once",
        BASE,
        Summary(20, 5, 20.0),
        30.0,
        Verdict.ROLL_BACK,
        10,
        "rolled_back",
    ),
    (
        "mid-step, too few to judge",
        BASE,
        Summary(MIN_REQUESTS - 1, 5, 20.0),
        30.0,
        Verdict.WAIT,
        10,
        "running",
    ),
    (
        "step end, few but failing",
        BASE,
        Summary(3, 1, 20.0),
        60.0,
        Verdict.ROLL_BACK,
        10,
        "rolled_back",
    ),
    (
        "step end, healthy: advance",
        BASE,
        Summary(100, 1, 20.0),
        60.0,
        Verdict.ADVANCE,
        40,
        "running",
    ),
    (
        "step end, slow: back",
        BASE,
        Summary(100, 0, 900.0),
        60.0,
        Verdict.ROLL_BACK,
        10,
        "rolled_back",
    ),
    ("step end, nothing served: advance", BASE, Summary(), 60.0, Verdict.ADVANCE, 40, "running"),
    (
        "last step: done",
        Rollout(3, 4, 80, 30, 60.0, 0.01, 0.0, next_at=60.0),
        Summary(100, 0, 900.0),  # p99 is not checked when max_p99_ms is 0
        60.0,
        Verdict.DONE,
        100,
        "done",
    ),
    (
        "not running: nothing",
        Rollout(3, 4, 10, 30, 60.0, 0.01, 0.0, state="done"),
        Summary(100, 90, 1.0),
        99.0,
        Verdict.WAIT,
        10,
        "done",
    ),
]


@pytest.mark.parametrize(
    ("rollout", "summary", "now", "verdict", "weight", "state"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_step(
    rollout: Rollout, summary: Summary, now: float, verdict: Verdict, weight: int, state: str
) -> None:
    updated, got = step(rollout, summary, now)
    assert got is verdict
    assert updated.weight == weight and updated.state == state
    if verdict is Verdict.ADVANCE:
        assert updated.next_at == now + rollout.every
        assert updated.requests == rollout.requests + summary.requests
    if verdict is Verdict.ROLL_BACK:
        assert updated.reason.startswith("rolled back to 3: ")


def test_outcomes_count_only_watched_revisions_and_start_over_on_take() -> None:
    outcomes = Outcomes()
    outcomes.add("default/f", 4, 500, 0.01)  # not watched yet: dropped
    outcomes.watch("default/f", 4)
    for i in range(100):
        outcomes.add("default/f", 4, 502 if i < 3 else 200, (i + 1) / 1000)
    outcomes.add("default/f", 3, 500, 0.01)  # the stable revision: not watched
    summary = outcomes.take("default/f", 4)
    assert (summary.requests, summary.errors) == (100, 3)
    assert summary.error_rate == pytest.approx(0.03)
    assert summary.p99_ms == pytest.approx(100.0)
    assert outcomes.peek("default/f", 4) == Summary()
    outcomes.unwatch("default/f", 4)
    outcomes.add("default/f", 4, 500, 0.01)
    assert outcomes.peek("default/f", 4) == Summary()


def test_outcomes_beyond_the_sample_keep_counting_every_request() -> None:
    outcomes = Outcomes()
    outcomes.watch("default/f", 4)
    total = MAX_SAMPLES * 2
    for i in range(total):
        outcomes.add("default/f", 4, 500 if i % 100 == 0 else 200, 0.001 if i % 2 else 0.002)
    summary = outcomes.peek("default/f", 4)
    assert summary.requests == total
    assert summary.error_rate == pytest.approx(0.01)
    assert summary.p99_ms == pytest.approx(2.0)
