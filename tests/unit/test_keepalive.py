"""`zygote_action()` as a table: the windows, what runs, how long the function was idle."""

from __future__ import annotations

import pytest

from ember.autoscaler.histogram import Windows
from ember.autoscaler.keepalive import Action, next_edges, zygote_action

FIXED = Windows(0.0, 600.0, representative=False, reason="fixed")
LEARNED = Windows(540.0, 120.0, representative=True, reason="p5 9 min, p99 10 min")

CASES = [
    ("in use keeps it", FIXED, True, True, 10_000.0, Action.KEEP),
    ("in use without a zygote: the request starts one", FIXED, False, True, 1.0, Action.NONE),
    ("fixed: within the keep-alive", FIXED, True, False, 599.0, Action.KEEP),
    ("fixed: past the keep-alive", FIXED, True, False, 600.0, Action.RELEASE),
    ("fixed: released stays released", FIXED, False, False, 700.0, Action.NONE),
    ("fixed: never pre-warms", FIXED, False, False, 10.0, Action.NONE),
    ("never used since start", FIXED, True, False, None, Action.NONE),
    ("learned: unloaded right after activity", LEARNED, True, False, 1.0, Action.RELEASE),
    ("learned: not yet time", LEARNED, False, False, 539.0, Action.NONE),
    ("learned: pre-warm at the head", LEARNED, False, False, 540.0, Action.PREWARM),
    ("learned: kept inside the window", LEARNED, True, False, 600.0, Action.KEEP),
    ("learned: released past the tail", LEARNED, True, False, 660.0, Action.RELEASE),
    ("learned: no pre-warm past the tail", LEARNED, False, False, 700.0, Action.NONE),
]


@pytest.mark.parametrize(
    ("windows", "zygote", "in_use", "idle_for", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_zygote_action(
    windows: Windows, zygote: bool, in_use: bool, idle_for: float | None, expected: Action
) -> None:
    assert zygote_action(windows, zygote, in_use, idle_for) is expected


EDGES = [
    ("fixed: the end of the keep-alive is ahead", FIXED, 10.0, [600.0]),
    ("fixed: past it, nothing changes any more", FIXED, 600.0, []),
    ("learned: before the head, both edges", LEARNED, 1.0, [540.0, 660.0]),
    ("learned: inside the window, its end", LEARNED, 600.0, [660.0]),
    ("learned: past the tail", LEARNED, 700.0, []),
]


@pytest.mark.parametrize(
    ("windows", "idle_for", "expected"),
    [case[1:] for case in EDGES],
    ids=[case[0] for case in EDGES],
)
def test_next_edges(windows: Windows, idle_for: float, expected: list[float]) -> None:
    assert next_edges(windows, idle_for) == expected


@pytest.mark.parametrize("windows", [FIXED, LEARNED], ids=["fixed", "learned"])
def test_the_answer_never_changes_between_edges(windows: Windows) -> None:
    """What lets the pool skip a quiet revision until its next edge: between two edges (or
    after the last), `zygote_action` gives one answer, whatever the zygote or the time."""
    for zygote in (True, False):
        idle_for = 0.5
        while idle_for < 900.0:
            edges = next_edges(windows, idle_for)
            until = edges[0] if edges else 900.0
            answer = zygote_action(windows, zygote, False, idle_for)
            for t in (idle_for, (idle_for + until) / 2, until - 0.01):
                assert zygote_action(windows, zygote, False, t) is answer, (zygote, t)
            idle_for = until + 0.01


def test_activity_says_when_a_function_as_a_whole_turns_busy_or_idle() -> None:
    """The pool steps every revision of a function only then (their zygotes' keep-alive
    depends on the function's activity, not one revision's)."""
    from ember.pool.activity import Activity

    activity = Activity(fixed_keepalive=60.0)
    assert activity.record("default/fn", True, 1.0)  # the first revision turns busy: it does
    assert not activity.record("default/fn", True, 1.5)  # a second revision: busy already
    assert not activity.record("default/fn", False, 2.0)  # one of two rests: still busy
    assert activity.record("default/fn", False, 2.5)  # the last rests: idle
    assert not activity.record("default/fn", False, 3.0)  # idle already
    assert activity.record("default/fn", True, 4.0)
    assert activity.histograms["default/fn"].total == 1  # the 1.5 s idle time, once
