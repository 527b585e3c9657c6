"""One function's request series, kept as plain numbers and rendered to Prometheus text only
when they changed since the last scrape.

`observe()` runs once per request on the hot path: a few dict operations, a bisect and no lock
(everything runs on the event loop). The exposition of a function is cached per metric family,
so a scrape of 1,000 functions of which a few were called re-renders those few and joins the
rest; the numbers of those few are copied on the loop and rendered on a worker thread.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from itertools import accumulate
from typing import NamedTuple

from prometheus_client import utils

# The Prometheus client's float formatting (Go's), typed: /metrics reads as it always did.
floatToGoString: Callable[[float], str] = utils.floatToGoString

BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
)
_LE = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]

# The families a function's requests feed, in the order /metrics lists them: (name, type, help).
FAMILIES = (
    ("ember_invocations_total", "counter", "Invocations by function and HTTP code"),
    ("ember_invocations_created", "gauge", "Invocations by function and HTTP code"),
    (
        "ember_invocation_duration_seconds",
        "histogram",
        "Time from request to response, by function",
    ),
    (
        "ember_invocation_duration_seconds_created",
        "gauge",
        "Time from request to response, by function",
    ),
    ("ember_starts_total", "counter", "Invocations by the start tier that served them"),
    ("ember_starts_created", "gauge", "Invocations by the start tier that served them"),
)


def number(value: float) -> str:
    """As the Prometheus client writes it (`floatToGoString`), counts the short way."""
    if type(value) is int and -1_000_000 < value < 1_000_000:
        return f"{value}.0"
    return str(floatToGoString(value))


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Numbers(NamedTuple):
    """A copy of one function's numbers, taken on the event loop, rendered anywhere."""

    calls: list[tuple[int, float, float]]  # code, count, created
    starts: list[tuple[str, float, float]]  # tier, count, created
    buckets: list[int]
    total: float
    observed: int
    created: float


class FunctionSeries:
    """Counters and the duration histogram of one function ("namespace/name").

    Updated only on the event loop. `version` counts the observations; `rendered` is the
    exposition of one version, (version, text), set in one assignment by whichever thread
    rendered it: current only while no observation came since."""

    __slots__ = (
        "buckets",
        "calls",
        "count",
        "created",
        "labels",
        "rendered",
        "starts",
        "total",
        "version",
    )

    def __init__(self, qualified: str) -> None:
        ns, _, fn = qualified.partition("/")
        self.labels = escape(fn), escape(ns)
        self.calls: dict[int, list[float]] = {}  # code -> [count, created]
        self.starts: dict[str, list[float]] = {}  # tier -> [count, created]
        self.buckets = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; last is +Inf
        self.total = 0.0
        self.count = 0
        self.created = time.time()
        self.version = 0
        self.rendered: tuple[int, tuple[str, ...]] = (-1, ())

    def observe(self, code: int, seconds: float, tier: str) -> None:
        calls = self.calls.get(code)
        if calls is None:
            calls = self.calls[code] = [0, time.time()]
        calls[0] += 1
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1
        if tier != "none":
            starts = self.starts.get(tier)
            if starts is None:
                starts = self.starts[tier] = [0, time.time()]
            starts[0] += 1
        self.version += 1

    def numbers(self) -> Numbers:
        """A consistent copy, on the event loop (nothing changes them meanwhile)."""
        return Numbers(  # sorted where it is rendered, off the loop
            [(code, n, created) for code, (n, created) in self.calls.items()],
            [(tier, n, created) for tier, (n, created) in self.starts.items()],
            list(self.buckets),
            self.total,
            self.count,
            self.created,
        )

    def render(self, numbers: Numbers) -> tuple[str, ...]:
        """The function's lines of each family of FAMILIES."""
        fn, ns = self.labels
        by_code, by_tier = sorted(numbers.calls), sorted(numbers.starts)
        both = f'function="{fn}",namespace="{ns}"'
        calls = "".join(
            f'ember_invocations_total{{code="{c}",{both}}} {number(n)}\n' for c, n, _ in by_code
        )
        calls_created = "".join(
            f'ember_invocations_created{{code="{c}",{both}}} {floatToGoString(t)}\n'
            for c, _, t in by_code
        )
        head = f'ember_invocation_duration_seconds_bucket{{function="{fn}",le="'
        tail = f'",namespace="{ns}"}} '
        lines = [
            f"{head}{le}{tail}{number(n)}\n"
            for le, n in zip(_LE, accumulate(numbers.buckets), strict=True)
        ]
        lines.append(
            f"ember_invocation_duration_seconds_count{{{both}}} {number(numbers.observed)}\n"
        )
        lines.append(
            f"ember_invocation_duration_seconds_sum{{{both}}} {floatToGoString(numbers.total)}\n"
        )
        created = (
            f"ember_invocation_duration_seconds_created{{{both}}} "
            f"{floatToGoString(numbers.created)}\n"
        )
        starts = "".join(
            f'ember_starts_total{{{both},tier="{tier}"}} {number(n)}\n' for tier, n, _ in by_tier
        )
        starts_created = "".join(
            f'ember_starts_created{{{both},tier="{tier}"}} {floatToGoString(t)}\n'
            for tier, _, t in by_tier
        )
        return calls, calls_created, "".join(lines), created, starts, starts_created
