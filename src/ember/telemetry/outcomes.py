"""Outcomes of the revisions a rollout watches: requests, 5xx errors, latencies.

The gateway adds every response; only watched revisions are kept (a set lookup otherwise).
The control plane reads them at each step of a rollout and starts over.
"""

from __future__ import annotations

import random

import msgspec

MAX_SAMPLES = 50_000  # latencies kept per watched revision and step (a uniform sample beyond)


class Summary(msgspec.Struct, frozen=True):
    requests: int = 0
    errors: int = 0  # status >= 500
    p99_ms: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Outcomes:
    def __init__(self) -> None:
        self._watched: dict[tuple[str, int], _Counts] = {}
        self._random = random.Random()

    def watch(self, function: str, revision: int) -> None:
        self._watched.setdefault((function, revision), _Counts())

    def unwatch(self, function: str, revision: int) -> None:
        self._watched.pop((function, revision), None)

    def forget(self, function: str) -> None:
        """Stop watching every revision of a removed function ("namespace/name")."""
        for key in [k for k in self._watched if k[0] == function]:
            del self._watched[key]

    def add(self, function: str, revision: int, status: int, seconds: float) -> None:
        counts = self._watched.get((function, revision))
        if counts is None:
            return
        counts.requests += 1
        counts.errors += status >= 500
        if len(counts.latencies) < MAX_SAMPLES:
            counts.latencies.append(seconds * 1000.0)
        else:  # reservoir sampling: every request equally likely to be in the sample
            slot = self._random.randrange(counts.requests)
            if slot < MAX_SAMPLES:
                counts.latencies[slot] = seconds * 1000.0

    def peek(self, function: str, revision: int) -> Summary:
        counts = self._watched.get((function, revision))
        if counts is None or not counts.requests:
            return Summary()
        ordered = sorted(counts.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return Summary(requests=counts.requests, errors=counts.errors, p99_ms=p99)

    def take(self, function: str, revision: int) -> Summary:
        """The summary so far, and start counting again."""
        summary = self.peek(function, revision)
        if (function, revision) in self._watched:
            self._watched[(function, revision)] = _Counts()
        return summary


class _Counts:
    __slots__ = ("errors", "latencies", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latencies: list[float] = []
