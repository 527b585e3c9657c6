"""Prometheus metrics for /metrics, rendered by Ember itself (no process-wide registry).

Per-function request series live in `series.py`: plain numbers updated on the hot path and
exposition text cached per function until its next request, so the cost of a scrape follows
the functions called since the last one, not all functions deployed. The instance gauges read
the pool's per-revision statistics through `RevisionCounts`, declared here: telemetry does not
import the pool (the pool imports telemetry); their text is cached per function too, until its
counts change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from itertools import accumulate
from typing import Protocol, TypeVar

from ember.telemetry.series import BUCKETS, FAMILIES, FunctionSeries, Numbers, escape, number

__all__ = [
    "BUCKETS",
    "HeapCounts",
    "Metrics",
    "NodeCounts",
    "RevisionCounts",
    "Scrape",
    "Statistics",
]


class RevisionCounts(Protocol):
    """What the gauges read of one revision (the pool's `RevisionStats` has these fields)."""

    @property
    def function(self) -> str: ...  # "namespace/name"
    @property
    def idle(self) -> int: ...
    @property
    def busy(self) -> int: ...
    @property
    def starting(self) -> int: ...
    @property
    def waiting(self) -> int: ...


Statistics = Callable[[], Iterable[RevisionCounts]]


class NodeCounts(Protocol):
    """What the node gauges read of the pool as a whole (the pool's `NodeStats`)."""

    @property
    def revisions(self) -> int: ...
    @property
    def functions_tracked(self) -> int: ...
    @property
    def cgroups_pending(self) -> int: ...
    @property
    def memory_used_mb(self) -> int: ...
    @property
    def memory_budget_mb(self) -> int: ...


class HeapCounts(Protocol):
    """The server's garbage collections by generation (server/heap.py's `HeapStats`)."""

    @property
    def collections(self) -> tuple[int, int, int]: ...
    @property
    def pause_seconds(self) -> tuple[float, float, float]: ...
    @property
    def pause_max_seconds(self) -> tuple[float, float, float]: ...
    @property
    def pause_buckets(self) -> tuple[tuple[int, ...], ...]: ...  # per PAUSE_LE, not cumulative
    @property
    def frozen(self) -> int: ...
    @property
    def full_collections(self) -> int: ...


PAUSE_LE = ("0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "+Inf")


_NODE_GAUGES = (
    (
        "ember_pool_revisions",
        "Revision pools the node holds (live, standby, draining)",
        "revisions",
    ),
    ("ember_pool_functions_tracked", "Functions with keep-alive state", "functions_tracked"),
    ("ember_cgroups_pending", "Cgroup directories waiting for removal", "cgroups_pending"),
    (
        "ember_memory_used_mb",
        "Memory budget in use (at rest as measured, at work at memory:)",
        "memory_used_mb",
    ),
    ("ember_memory_budget_mb", "The node's memory budget", "memory_budget_mb"),
)


def _header(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


_INSTANCES = _header("ember_instances", "gauge", "Instances by function and state")
_WAITING = _header("ember_waiting_requests", "gauge", "Requests waiting for a free instance")
_HEADERS = [_header(name, kind, help_text) for name, kind, help_text in FAMILIES]
SLICE = 0.001  # seconds a scrape runs on the event loop before it lets requests in
# ... for this long: a request takes several turns of the loop (its head, the instance's answer),
# and a scrape that yielded one turn at a time took a slice from each of them.
PAUSE = 0.001
JOIN_STEP = 100  # functions whose text is joined at once (the histograms: ~200 KB)
STEP = 32  # functions copied or counted between two looks at the clock
T = TypeVar("T")
Counts = tuple[int, int, int, int]  # idle, busy, starting, waiting


def _gauge_text(function: str, counts: Counts) -> tuple[str, str]:
    ns, _, name = function.partition("/")
    both = f'function="{escape(name)}",namespace="{escape(ns)}"'
    idle, busy, starting, waiting = counts
    states = "".join(
        f'ember_instances{{{both},state="{state}"}} {number(n)}\n'
        for state, n in (("busy", busy), ("idle", idle), ("starting", starting))
    )
    return states, f"ember_waiting_requests{{{both}}} {number(waiting)}\n"


def _heap_text(heap: HeapCounts) -> list[str]:
    """The collector's pauses: what a request may have waited while the loop collected."""
    pauses = [
        _header(
            "ember_gc_pause_seconds",
            "histogram",
            "Garbage collections of the server by generation, and how long each held it",
        )
    ]
    for gen in range(3):
        label = f'generation="{gen}"'
        counts = accumulate(heap.pause_buckets[gen])
        pauses += [
            f'ember_gc_pause_seconds_bucket{{{label},le="{le}"}} {number(n)}\n'
            for le, n in zip(PAUSE_LE, counts, strict=True)
        ]
        pauses.append(f"ember_gc_pause_seconds_count{{{label}}} {number(heap.collections[gen])}\n")
        pauses.append(f"ember_gc_pause_seconds_sum{{{label}}} {number(heap.pause_seconds[gen])}\n")
    longest = [
        _header(
            "ember_gc_pause_max_seconds", "gauge", "The longest garbage collection, by generation"
        )
    ]
    longest += [
        f'ember_gc_pause_max_seconds{{generation="{gen}"}} {number(heap.pause_max_seconds[gen])}\n'
        for gen in range(3)
    ]
    frozen = (
        _header("ember_gc_frozen_objects", "gauge", "Objects frozen out of the collector's way")
        + f"ember_gc_frozen_objects {number(heap.frozen)}\n"
    )
    full = (
        _header(
            "ember_gc_full_collections_total",
            "counter",
            "Collections of everything, frozen objects included (once as many were frozen again)",
        )
        + f"ember_gc_full_collections_total {number(heap.full_collections)}\n"
    )
    return [*pauses, *longest, frozen, full]


QueueCounts = tuple[str, int, float, dict[str, int]]  # function, depth, oldest age, totals


def _queue_text(rows: list[QueueCounts]) -> list[str]:
    """Async invocations: what waits, for how long, and how many were accepted and ended."""
    depth = [_header("ember_async_queue_depth", "gauge", "Async invocations queued")]
    age = [
        _header(
            "ember_async_oldest_age_seconds",
            "gauge",
            "Seconds since the oldest queued async invocation was accepted",
        )
    ]
    totals = [
        _header(
            "ember_async_invocations_total",
            "counter",
            "Async invocations accepted, and ended by status, since the server started",
        )
    ]
    for function, queued, oldest, counts in rows:
        ns, _, name = function.partition("/")
        both = f'function="{escape(name)}",namespace="{escape(ns)}"'
        depth.append(f"ember_async_queue_depth{{{both}}} {number(queued)}\n")
        age.append(f"ember_async_oldest_age_seconds{{{both}}} {number(oldest)}\n")
        totals += [
            f'ember_async_invocations_total{{{both},status="{what}"}} {number(n)}\n'
            for what, n in sorted(counts.items())
        ]
    return [*depth, *age, *totals] if rows else []


class TriggerCounts(Protocol):
    """ember.triggers.runner.Statistics, as /metrics reads it."""

    @property
    def state(self) -> str: ...
    @property
    def delivered(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def filtered(self) -> int: ...
    @property
    def lag(self) -> int: ...
    @property
    def oldest_age(self) -> float: ...


_TRIGGER_STATES = ("starting", "running", "paused", "failing")


def _trigger_text(rows: Sequence[tuple[str, str, TriggerCounts]]) -> list[str]:
    """Event triggers: events by outcome, lag, the oldest one's age, and the state."""
    events = [
        _header(
            "ember_trigger_events_total",
            "counter",
            "Events by outcome (delivered, queued, failed, filtered) since the trigger started",
        )
    ]
    lag = [_header("ember_trigger_lag", "gauge", "Events held or still in the broker")]
    age = [
        _header("ember_trigger_oldest_age_seconds", "gauge", "Age of the oldest undelivered event")
    ]
    state = [_header("ember_trigger_state", "gauge", "1 for the trigger's current state")]
    for function, trigger, c in rows:
        ns, _, name = function.partition("/")
        labels = f'function="{escape(name)}",namespace="{escape(ns)}",trigger="{escape(trigger)}"'
        for outcome in ("delivered", "queued", "failed", "filtered"):
            value = number(getattr(c, outcome))
            events.append(f'ember_trigger_events_total{{{labels},outcome="{outcome}"}} {value}\n')
        lag.append(f"ember_trigger_lag{{{labels}}} {number(c.lag)}\n")
        age.append(f"ember_trigger_oldest_age_seconds{{{labels}}} {number(c.oldest_age)}\n")
        state += [
            f'ember_trigger_state{{{labels},state="{s}"}} {int(c.state == s)}\n'
            for s in _TRIGGER_STATES
        ]
    return [*events, *lag, *age, *state] if rows else []


Steps = Generator[None, None, T]  # work done in steps: it yields where it may pause


def _finish(steps: Steps[T]) -> T:
    """Run `steps` to the end at once."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def _finish_async(steps: Steps[T]) -> T:
    """Run `steps` on the event loop, pausing PAUSE every SLICE seconds for requests."""
    clock = time.perf_counter
    until = clock() + SLICE
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if clock() > until:
            await asyncio.sleep(PAUSE)
            until = clock() + SLICE


class Scrape:
    """One /metrics response: what changed was copied on the event loop (`Metrics.scrape`);
    `render()` formats it anywhere, `render_async()` on the event loop in slices."""

    def __init__(
        self,
        chunks: list[tuple[str, ...] | None],
        todo: list[tuple[int, FunctionSeries, int, Numbers]],
        tail: list[str],
    ) -> None:
        self._chunks = chunks
        self._todo = todo
        self._tail = tail

    @property
    def changed(self) -> int:
        """Functions whose text this scrape renders (called since they were last rendered)."""
        return len(self._todo)

    def render(self) -> bytes:
        return b"".join(_finish(self._parts()))

    async def render_async(self) -> bytes:
        """As `render()`, on the event loop, a slice at a time. (On a worker thread the render
        held the GIL for the interpreter's switch interval each time the loop wanted it back:
        a request waited that long, more than once.)"""
        parts = await _finish_async(self._parts())
        # Megabytes: bytes.join copies them without the GIL (over 1 MB), on a worker thread.
        return await asyncio.to_thread(b"".join, parts)

    def _parts(self) -> Steps[list[bytes]]:
        for i, series, version, numbers in self._todo:
            self._chunks[i] = text = series.render(numbers)
            series.rendered = (version, text)
            yield
        parts: list[bytes] = []
        chunks = [chunk for chunk in self._chunks if chunk is not None]
        for family in range(len(_HEADERS) if chunks else 0):  # none: no family at all
            parts.append(_HEADERS[family].encode())
            for start in range(0, len(chunks), JOIN_STEP):
                piece = chunks[start : start + JOIN_STEP]
                parts.append("".join([chunk[family] for chunk in piece]).encode())
                yield
        parts.append("".join(self._tail).encode())
        return parts


class Metrics:
    def __init__(
        self,
        stats: Statistics,
        node: Callable[[], NodeCounts] | None = None,
        heap: Callable[[], HeapCounts] | None = None,
    ) -> None:
        self._stats = stats
        self._node = node
        self._heap = heap
        self._series: dict[str, FunctionSeries] = {}  # "namespace/name" -> its series
        self._gauges: dict[str, tuple[Counts, tuple[str, str]]] = {}  # text per counts
        # The async queue per function (ember.queue.dispatcher's `statistics`), when one runs.
        self.queue: Callable[[], list[QueueCounts]] | None = None
        # Event triggers (ember.triggers.manager's `statistics`).
        self.triggers: Callable[[], Sequence[tuple[str, str, TriggerCounts]]] | None = None

    def observe(self, qualified: str, code: int, seconds: float, tier: str) -> None:
        """`qualified` is "namespace/name"; once per request."""
        series = self._series.get(qualified)
        if series is None:
            series = self._series[qualified] = FunctionSeries(qualified)
        series.observe(code, seconds, tier)

    def forget(self, qualified: str) -> None:
        """Remove every series of a removed function ("namespace/name"): /metrics no longer
        lists it. A later request starts its series from zero."""
        self._series.pop(qualified, None)
        self._gauges.pop(qualified, None)

    def scrape(self) -> Scrape:
        """On the event loop: the cached text of functions not called since they were last
        rendered, a copy of the others' numbers, and the gauges (the pool's statistics)."""
        return _finish(self._scrape())

    async def scrape_async(self) -> Scrape:
        """As `scrape()`, a slice at a time (each function's numbers are copied whole;
        functions called meanwhile may be one request apart, as they would be a moment
        later)."""
        return await _finish_async(self._scrape())

    def render(self) -> bytes:
        return self.scrape().render()

    def _scrape(self) -> Steps[Scrape]:
        chunks: list[tuple[str, ...] | None] = []
        todo: list[tuple[int, FunctionSeries, int, Numbers]] = []
        for n, series in enumerate(list(self._series.values())):
            version, text = series.rendered
            if version == series.version:
                chunks.append(text)
            else:
                todo.append((len(chunks), series, series.version, series.numbers()))
                chunks.append(None)
            if n % STEP == STEP - 1:
                yield
        tail = yield from self._instance_gauges()
        if self._node is not None:
            counts = self._node()
            for name, help_text, field in _NODE_GAUGES:
                value = number(getattr(counts, field))
                tail.append(f"{_header(name, 'gauge', help_text)}{name} {value}\n")
        if self._heap is not None:
            tail += _heap_text(self._heap())
        if self.queue is not None:
            tail += _queue_text(self.queue())
        if self.triggers is not None:
            tail += _trigger_text(self.triggers())
        return Scrape(chunks, todo, tail)

    def _instance_gauges(self) -> Steps[list[str]]:
        totals: dict[str, Counts] = {}
        for n, s in enumerate(self._stats()):
            idle, busy, starting, waiting = totals.get(s.function, (0, 0, 0, 0))
            totals[s.function] = (
                idle + s.idle,
                busy + s.busy,
                starting + s.starting,
                waiting + s.waiting,
            )
            if n % STEP == STEP - 1:
                yield
        states, waiting_lines = [_INSTANCES], [_WAITING]
        order = sorted(totals, key=lambda f: f.partition("/")[::2])
        yield
        for n, function in enumerate(order):
            counts = totals[function]
            cached = self._gauges.get(function)
            if cached is None or cached[0] != counts:
                cached = self._gauges[function] = (counts, _gauge_text(function, counts))
            states.append(cached[1][0])
            waiting_lines.append(cached[1][1])
            if n % STEP == STEP - 1:
                yield
        for gone in self._gauges.keys() - totals.keys():
            self._gauges.pop(gone, None)
        return states + waiting_lines
