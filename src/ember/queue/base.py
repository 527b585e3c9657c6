"""The queue's records and the `Queue` protocol both backends (SQLite, NATS JetStream) meet.

An `Invocation` is the whole story of one async call: the request as accepted, its attempts,
its status and, once it ended, the result. A backend stores it durably and hands ready ones to
the dispatcher; every decision (retry, expire, dead) is the dispatcher's (`policy.py`), so both
backends behave the same, which one parametrised suite checks (tests/unit/test_queue_contract.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol

import msgspec

Headers = list[tuple[bytes, bytes]]

QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, DEAD, EXPIRED, CANCELLED = "succeeded", "failed", "dead", "expired", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, DEAD, EXPIRED, CANCELLED)
ENDED = frozenset({SUCCEEDED, FAILED, DEAD, EXPIRED, CANCELLED})


class Attempt(msgspec.Struct, frozen=True, gc=False):
    number: int  # 1, 2, ...
    request_id: str  # the activation record of this attempt
    started: float  # unix time
    duration_ms: float
    status: int  # the HTTP status the attempt ended with (Ember's own for crash, timeout)
    outcome: str  # ok | error | 5xx | 429 | timeout | crash | interrupted
    error: str = ""  # Ember's error code, when Ember answered


class Result(msgspec.Struct, frozen=True, gc=False):
    status: int
    headers: Headers
    body: bytes


# gc=False: these hold no cycles, and thousands a second are made under load: the collector
# need not track them.
class Invocation(msgspec.Struct, kw_only=True, gc=False):
    id: str
    function: str  # "namespace/name": the queue it waits in
    method: str
    # As a synchronous request to it would be: "/fn/[namespace/]name[@alias]/rest", routed
    # again at each attempt (aliases and weights as they are then).
    path: str
    raw_path: str  # the same, as sent (percent-escapes kept), latin-1
    query: bytes
    headers: Headers  # as the function sees them (no Ember key)
    body: bytes
    accepted: float  # unix time, durable
    authorized: bool = False  # the caller showed an invoke key for the namespace
    callback: str = ""  # X-Callback-Url
    idempotency_key: str = ""
    status: str = QUEUED
    attempts: list[Attempt] = []
    not_before: float = 0.0  # unix time its next attempt may start
    ended: float = 0.0
    result: Result | None = None
    reason: str = ""  # why it ended (the last outcome, "expired after 6h", "cancelled")
    notify: bool = False  # ended, and its callback and destinations are not all sent yet
    seq: int = 0  # the backend's order of acceptance

    def interrupted(self, now: float) -> None:
        """Queued again after a server stopped while it ran (it may have run: at least once),
        with an `interrupted` attempt, which spends no retry. Both backends' recovery."""
        self.attempts = [
            *self.attempts,
            Attempt(
                number=len(self.attempts) + 1,
                request_id="",
                started=now,
                duration_ms=0.0,
                status=0,
                outcome="interrupted",
                error="the server stopped while it ran",
            ),
        ]
        self.status, self.not_before = QUEUED, now

    @property
    def counted_attempts(self) -> int:
        """Attempts that spent a retry: one the server's stop interrupted does not."""
        return sum(1 for a in self.attempts if a.outcome != "interrupted")


Invocations = list[Invocation]  # (a `list` method would shadow the builtin in the protocol)


class Backlog(msgspec.Struct, frozen=True):
    depth: int  # queued (waiting or due)
    oldest: float  # unix time the oldest queued one was accepted; 0 when none


class Queue(Protocol):
    """Durable storage of invocations. Every method is safe to call concurrently from the event
    loop; what a write returns from is durable (fsync'd, or acknowledged by the broker)."""

    name: str  # "sqlite" | "nats"
    # Bytes one stored invocation may take (request and result), known once open; 0: no limit.
    max_record: int

    async def open(self) -> None:
        """Open, and put every invocation left `running` by a previous server back to `queued`
        with an `interrupted` attempt (it may have run: at-least-once)."""

    async def close(self) -> None: ...

    def put(self, inv: Invocation) -> Awaitable[Invocation]:
        """Store a new invocation, durably. With an `idempotency_key` already stored for its
        function (within the retention), nothing is stored and the first one is returned.
        One that already ended (a trigger's event whose only attempt settled it) is stored as
        ended: never taken, listed, in the dead letters if dead, and `unsent` if `notify`.
        (An awaitable: a backend may answer with a future, which costs less than a task.)"""

    async def take(self, function: str, limit: int) -> Invocations:
        """Up to `limit` queued invocations of `function` whose `not_before` has passed, oldest
        first, now `running` (not necessarily durably: a crash leaves them queued)."""

    async def next_due(self, function: str) -> float | None:
        """When the earliest queued invocation of `function` is due (unix time), or None."""

    def save(self, inv: Invocation) -> Awaitable[None]:
        """Store an invocation's new state after an attempt (queued again, or ended), durably."""

    async def get(self, id: str) -> Invocation | None: ...

    async def list(self, function: str, status: str | None = None, limit: int = 100) -> Invocations:
        """Newest first."""

    async def cancel(self, id: str, now: float) -> Invocation | None:
        """`queued` → `cancelled`, atomically; None (nothing changed) when it is not queued."""

    async def replay(self, function: str, ids: Sequence[str] | None, now: float) -> Invocations:
        """Dead invocations of `function` (these ids, or all) queued again with no attempts."""

    async def purge(self, function: str) -> int:
        """Forget the function's dead invocations; how many."""

    async def backlog(self) -> dict[str, Backlog]:
        """Per function with queued work."""

    async def unsent(self) -> Invocations:
        """Ended invocations whose callback or destinations are still to be sent."""

    async def prune(self, ended_before: float) -> int:
        """Forget invocations that ended before this time (and their idempotency keys)."""

    async def forget(self, function: str) -> int:
        """`ember rm`: every invocation of the function."""
