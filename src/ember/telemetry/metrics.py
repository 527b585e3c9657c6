"""Prometheus metrics on a registry of our own (no process-wide singletons).

The instance gauges read the pool's per-revision statistics through `RevisionCounts`, declared
here: telemetry does not import the pool (the pool imports telemetry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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


_NODE_GAUGES = (
    (
        "ember_pool_revisions",
        "Revision pools the node holds (live, standby, draining)",
        "revisions",
    ),
    ("ember_pool_functions_tracked", "Functions with keep-alive state", "functions_tracked"),
    ("ember_cgroups_pending", "Cgroup directories waiting for removal", "cgroups_pending"),
    ("ember_memory_used_mb", "Memory budget in use (each instance at memory:)", "memory_used_mb"),
    ("ember_memory_budget_mb", "The node's memory budget", "memory_budget_mb"),
)


class _NodeCollector(Collector):
    def __init__(self, node: Callable[[], NodeCounts]) -> None:
        self._node = node

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._node()
        for name, help_text, field in _NODE_GAUGES:
            yield GaugeMetricFamily(name, help_text, value=getattr(counts, field))


class _InstanceCollector(Collector):
    def __init__(self, stats: Statistics) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ember_instances",
            "Instances by function and state",
            labels=["namespace", "function", "state"],
        )
        totals: dict[tuple[str, str, str], int] = {}
        waiting = GaugeMetricFamily(
            "ember_waiting_requests",
            "Requests waiting for a free instance",
            labels=["namespace", "function"],
        )
        queued: dict[tuple[str, str], int] = {}
        for s in self._stats():
            ns, _, name = s.function.partition("/")
            for state, n in (("idle", s.idle), ("busy", s.busy), ("starting", s.starting)):
                totals[(ns, name, state)] = totals.get((ns, name, state), 0) + n
            queued[(ns, name)] = queued.get((ns, name), 0) + s.waiting
        for labels, n in sorted(totals.items()):
            family.add_metric(list(labels), n)
        for pair, n in sorted(queued.items()):
            waiting.add_metric(list(pair), n)
        yield family
        yield waiting


class Metrics:
    def __init__(self, stats: Statistics, node: Callable[[], NodeCounts] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.invocations = Counter(
            "ember_invocations",
            "Invocations by function and HTTP code",
            ["namespace", "function", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "ember_invocation_duration_seconds",
            "Time from request to response, by function",
            ["namespace", "function"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.starts = Counter(
            "ember_starts",
            "Invocations by the start tier that served them",
            ["namespace", "function", "tier"],
            registry=self.registry,
        )
        self.registry.register(_InstanceCollector(stats))
        if node is not None:
            self.registry.register(_NodeCollector(node))
        # function -> (code, tier) -> its children: labels() costs a lock and a dict build
        self._children: dict[str, dict[tuple[int, str], tuple[Any, Any, Any]]] = {}

    def observe(self, qualified: str, code: int, seconds: float, tier: str) -> None:
        """`qualified` is "namespace/name"."""
        of_function = self._children.get(qualified)
        if of_function is None:
            of_function = self._children[qualified] = {}
        children = of_function.get((code, tier))
        if children is None:
            ns, _, fn = qualified.partition("/")
            children = of_function[(code, tier)] = (
                self.invocations.labels(ns, fn, str(code)),
                self.duration.labels(ns, fn),
                self.starts.labels(ns, fn, tier) if tier != "none" else None,
            )
        calls, duration, starts = children
        calls.inc()
        duration.observe(seconds)
        if starts is not None:
            starts.inc()

    def forget(self, qualified: str) -> None:
        """Remove every series of a removed function ("namespace/name"): /metrics no longer
        lists it and its children are freed. A later request starts its series from zero."""
        ns, _, fn = qualified.partition("/")
        for code, tier in self._children.pop(qualified, {}):
            self.invocations.remove(ns, fn, str(code))
            if tier != "none":
                self.starts.remove(ns, fn, tier)
        self.duration.remove(ns, fn)

    def render(self) -> bytes:
        return generate_latest(self.registry)
