"""Prometheus metrics on a registry of our own (no process-wide singletons)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ember.pool.revision import RevisionStats

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


class _InstanceCollector(Collector):
    def __init__(self, stats: Callable[[], list[RevisionStats]]) -> None:
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
    def __init__(self, stats: Callable[[], list[RevisionStats]]) -> None:
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
        self._children: dict[tuple[str, int, str], tuple[Any, Any, Any]] = {}

    def observe(self, qualified: str, code: int, seconds: float, tier: str) -> None:
        """`qualified` is "namespace/name"."""
        key = (qualified, code, tier)
        children = self._children.get(key)
        if children is None:  # labels() costs a lock and a dict build per call: once per key
            ns, _, fn = qualified.partition("/")
            children = self._children[key] = (
                self.invocations.labels(ns, fn, str(code)),
                self.duration.labels(ns, fn),
                self.starts.labels(ns, fn, tier) if tier != "none" else None,
            )
        calls, duration, starts = children
        calls.inc()
        duration.observe(seconds)
        if starts is not None:
            starts.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
