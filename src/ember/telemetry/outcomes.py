"""Outcomes of the revisions a rollout watches: requests, 5xx errors, latencies.

The gateway adds every response; only watched revisions are kept (a set lookup otherwise).
The control plane reads them at each step of a rollout and starts over.
"""

from __future__ import annotations

import msgspec

MAX_SAMPLES = 50_000  # latencies kept per watched revision and step


class Summary(msgspec.Struct, frozen=True):
    requests: int = 0
    errors: int = 0  # status >= 500
    p99_ms: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Outcomes:
    def __init__(self) -> None:
        self._watched: dict[tuple[str, int], list[float]] = {}  # latencies, ms
        self._errors: dict[tuple[str, int], int] = {}

    def watch(self, function: str, revision: int) -> None:
        self._watched.setdefault((function, revision), [])
        self._errors.setdefault((function, revision), 0)

    def unwatch(self, function: str, revision: int) -> None:
        self._watched.pop((function, revision), None)
        self._errors.pop((function, revision), None)

    def add(self, function: str, revision: int, status: int, seconds: float) -> None:
        latencies = self._watched.get((function, revision))
        if latencies is None:
            return
        if len(latencies) < MAX_SAMPLES:
            latencies.append(seconds * 1000.0)
        if status >= 500:
            self._errors[(function, revision)] += 1

    def peek(self, function: str, revision: int) -> Summary:
        latencies = self._watched.get((function, revision), [])
        errors = self._errors.get((function, revision), 0)
        if not latencies:
            return Summary(errors=errors)
        ordered = sorted(latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return Summary(requests=len(latencies), errors=errors, p99_ms=p99)

    def take(self, function: str, revision: int) -> Summary:
        """The summary so far, and start counting again."""
        summary = self.peek(function, revision)
        if (function, revision) in self._watched:
            self._watched[(function, revision)] = []
            self._errors[(function, revision)] = 0
        return summary
