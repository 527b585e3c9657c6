"""The hybrid histogram keep-alive policy as tables of named idle-time histories."""

from __future__ import annotations

import math

import pytest

from ember.autoscaler.histogram import IdleHistogram, Windows, loaded, windows

FIXED = 600.0
HOURS_4 = 4 * 3600.0


def hist(idle_times: list[float]) -> IdleHistogram:
    h = IdleHistogram()
    for idle in idle_times:
        h.record(idle)
    return h


def fixed(reason: str) -> Windows:
    return Windows(0.0, FIXED, representative=False, reason=reason)


PERIODIC_10_MIN = [585.0 + 2 * i for i in range(20)]  # 8 in [540, 600), 12 in [600, 660)

CASES = [
    ("no idle times", [], fixed("fixed: 0 idle times in range < 10")),
    ("nine idle times are too few", [600.0] * 9, fixed("fixed: 9 idle times in range < 10")),
    (
        "periodic 10 min: pre-warm 10 % before bin 9, keep past bin 10",
        PERIODIC_10_MIN,
        Windows(486.0, 240.0, True, "p5 bin 9, p99 bin 10, CV 11.13"),
    ),
    (
        "the head skips the lowest 5 %",
        [590.0] + [610.0] * 39,  # 1 of 40 in bin 9
        Windows(540.0, 186.0, True, "p5 bin 10, p99 bin 10, CV 15.08"),
    ),
    (
        "the tail skips the highest 1 %: exactly 1 % in bin 30 is past p99",
        [610.0] * 99 + [1810.0],
        Windows(540.0, 186.0, True, "p5 bin 10, p99 bin 10, CV 15.31"),
    ),
    (
        "frequent: all in bin 0 keeps it loaded 66 s",
        [5.0] * 50,
        Windows(0.0, 66.0, True, "p5 bin 0, p99 bin 0, CV 15.46"),
    ),
    (
        "spread evenly over 4 h: CV 0",
        [15.0 * i + 7.5 for i in range(960)],  # 4 per bin
        fixed("fixed: bin count CV 0.00 < 2"),
    ),
    (
        "sparse and spread still passes the CV test: keep nearly the whole range",
        [1200.0 * k + 30.0 for k in range(12)],  # bins 0, 20, ..., 220
        Windows(0.0, 14586.0, True, "p5 bin 0, p99 bin 220, CV 4.36"),
    ),
    (
        "mostly out of bounds",
        [600.0] * 10 + [HOURS_4 + 1] * 11,
        fixed("fixed: 11 of 21 idle times beyond 14400 s"),
    ),
    (
        "half out of bounds is still representative",
        [600.0] * 10 + [HOURS_4 + 1] * 10,
        Windows(540.0, 186.0, True, "p5 bin 10, p99 bin 10, CV 15.46"),
    ),
]


@pytest.mark.parametrize(("idle_times", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_windows(idle_times: list[float], want: Windows) -> None:
    assert windows(hist(idle_times), FIXED) == want


def test_periodic_windows_cover_every_idle_time() -> None:
    w = windows(hist(PERIODIC_10_MIN), FIXED)
    assert all(loaded(w, idle) for idle in PERIODIC_10_MIN)
    assert not loaded(w, 0.0)
    assert not loaded(w, 60.0 * 13)


LOADED = [
    ("keep-alive: at the end of activity", Windows(0.0, 600.0, False, ""), 0.0, True),
    ("keep-alive: just before it ends", Windows(0.0, 600.0, False, ""), 599.999, True),
    ("keep-alive: at its end", Windows(0.0, 600.0, False, ""), 600.0, False),
    ("pre-warm: before the pre-warm point", Windows(486.0, 240.0, True, ""), 485.999, False),
    ("pre-warm: at the pre-warm point", Windows(486.0, 240.0, True, ""), 486.0, True),
    ("pre-warm: just before the end", Windows(486.0, 240.0, True, ""), 725.999, True),
    ("pre-warm: at the end", Windows(486.0, 240.0, True, ""), 726.0, False),
    ("pre-warm: right after activity", Windows(486.0, 240.0, True, ""), 0.0, False),
]


@pytest.mark.parametrize(
    ("w", "idle_for", "want"), [c[1:] for c in LOADED], ids=[c[0] for c in LOADED]
)
def test_loaded(w: Windows, idle_for: float, want: bool) -> None:
    assert loaded(w, idle_for) is want


RECORD = [
    ("zero goes in the first bin", 0.0, 0, 0),
    ("just under a minute: first bin", 59.999, 0, 0),
    ("one minute: second bin", 60.0, 1, 0),
    ("just under 4 h: last bin", HOURS_4 - 0.001, 239, 0),
    ("exactly 4 h is out of bounds", HOURS_4, None, 1),
    ("infinity is out of bounds", math.inf, None, 1),
]


@pytest.mark.parametrize(
    ("idle", "index", "oob"), [c[1:] for c in RECORD], ids=[c[0] for c in RECORD]
)
def test_record(idle: float, index: int | None, oob: int) -> None:
    h = hist([idle])
    assert len(h.counts) == 240
    assert h.out_of_bounds == oob
    assert h.total == (0 if index is None else 1)
    assert [i for i, c in enumerate(h.counts) if c] == ([] if index is None else [index])


@pytest.mark.parametrize("idle", [-1.0, math.nan])
def test_record_rejects_bad_idle_times(idle: float) -> None:
    with pytest.raises(ValueError, match="idle time must be a number >= 0"):
        IdleHistogram().record(idle)


def test_custom_bins() -> None:
    h = IdleHistogram(bins=10, bin_s=1.0)
    for _ in range(10):
        h.record(3.5)
    h.record(10.0)
    assert (h.counts[3], h.total, h.out_of_bounds) == (10, 10, 1)
    assert windows(h, FIXED) == Windows(2.0, 3.0, True, "p5 bin 3, p99 bin 3, CV 3.00")
