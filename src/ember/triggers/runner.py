"""One running trigger: the `Events` its source hands messages to, and what happens to each.

A message is filtered, then (in order per key, or batched, when delivery says so) delivered as
a CloudEvents request through `Gateway.run`, the path every invocation takes. It is acked once
the function succeeded or the event is stored in the durable async queue (a failure is handed
to the queue with its first attempt, and from there follows the function's `async:` settings);
nacked when neither happened. At most `delivery.capacity` messages are held unacknowledged:
`put` waits beyond that, so a slow function slows the source down (docs/triggers.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec

from ember.gateway.app import Exchange, Response
from ember.queue import policy
from ember.queue.base import Invocation
from ember.triggers import envelope
from ember.triggers.base import Message, Source
from ember.triggers.plan import QUEUE, Plan

log = logging.getLogger("ember.triggers")
STARTING, RUNNING, PAUSED, FAILING = "starting", "running", "paused", "failing"
_batch_results = msgspec.json.Decoder(dict[str, Any])


class Host(Protocol):
    """What a trigger needs of the server (ember.triggers.manager.Triggers)."""

    def run(
        self,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        done: Callable[[Exchange, Response], None],
    ) -> None: ...

    def queue(
        self, invocation: Invocation, failed: tuple[Exchange, Response] | None
    ) -> Awaitable[Any]: ...

    def invocation(
        self, function: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Invocation: ...

    async def load_state(self, trigger_id: str) -> bytes: ...

    async def save_state(self, trigger_id: str, state: bytes) -> None: ...


class Statistics(msgspec.Struct, frozen=True):
    state: str
    error: str
    since: float
    delivered: int  # succeeded at once
    queued: int  # handed to the async queue (mode queue, or after a failed first attempt)
    failed: int  # neither: nacked back to the broker
    filtered: int
    lag: int  # held here unacknowledged plus what the broker says it still has
    oldest_age: float


class Trigger:
    """Meets `ember.triggers.base.Events` for its source."""

    def __init__(self, id: str, function: str, name: str, plan: Plan, host: Host) -> None:
        self.id, self.function, self.name = id, function, name
        self.plan = plan
        self.delivery = plan.delivery
        self.host = host
        self.path = f"/fn/{function}{plan.delivery.path}"
        self.source: Source | None = None
        self.state, self.error, self.since = STARTING, "", time.time()
        self.delivered = self.queued = self.failed = self.filtered = 0
        self.pending, self.pending_oldest = 0, 0.0
        self.held: dict[int, Message] = {}  # id(message) -> message, unacknowledged
        self._room = asyncio.Event()
        self._room.set()
        self._busy: dict[str, deque[Message]] = {}  # order_by key -> waiting behind the first
        self._ordered: set[int] = set()  # id(message) of those holding their key
        self._batch: list[Message] = []
        self._batch_timer: asyncio.TimerHandle | None = None
        self._acks: list[tuple[bool, Message]] = []
        self._acking: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.loop = asyncio.get_running_loop()

    # ---- lifecycle ----
    async def start(self) -> None:
        self.source = self.plan.source(dict(self.plan.config), self)
        self._set(STARTING, "")
        await self.source.start()

    async def stop(self, state: str = PAUSED) -> None:
        """Stop reading; what is held and not yet settled goes back to the broker."""
        source, self.source = self.source, None
        if self._batch_timer is not None:
            self._batch_timer.cancel()
        if source is not None:
            await source.stop()
        if self._acking is not None:
            self._acking.cancel()
        self._set(state, self.error if state == FAILING else "")

    # ---- Events ----
    @property
    def room(self) -> int:
        return max(self.delivery.capacity - len(self.held), 0)

    async def put(self, message: Message) -> None:
        while len(self.held) >= self.delivery.capacity:
            self._room.clear()
            await self._room.wait()
        self.held[id(message)] = message
        if not self.plan.wanted(message.event):
            self.filtered += 1
            self._settle(message, True)
        elif self.delivery.batch_size > 1:
            self._add_to_batch(message)
        elif self.delivery.order_by:
            self._in_order(message)
        else:
            self._deliver(message)

    async def free(self) -> int:
        want = max(1, self.delivery.capacity // 2)
        while self.room < want:
            self._room.clear()
            await self._room.wait()
        return self.room

    def connected(self) -> None:
        if self.state != RUNNING:
            self._set(RUNNING, "")

    def failing(self, error: str) -> None:
        if self.source is not None:  # not a session a stop cut short
            self._set(FAILING, error)
            log.warning("trigger %s of %s: %s", self.name, self.function, error)

    def backlog(self, pending: int, oldest: float = 0.0) -> None:
        self.pending, self.pending_oldest = pending, oldest

    async def load_state(self) -> bytes:
        return await self.host.load_state(self.id)

    async def save_state(self, state: bytes) -> None:
        await self.host.save_state(self.id, state)

    # ---- delivery ----
    def _deliver(self, message: Message) -> None:
        if self.delivery.structured:
            headers, body = envelope.structured(message.event)
        else:
            headers, body = envelope.binary(message.event)
        if self.delivery.mode == QUEUE:
            inv = self.host.invocation(self.function, self.path, headers, body)
            self._queue(inv, None, [message])
            return

        def done(exchange: Exchange, response: Response) -> None:
            if policy.outcome(response.status, exchange.error) == "ok":
                self.delivered += 1
                self._settle(message, True)
            else:
                inv = self.host.invocation(self.function, self.path, headers, body)
                self._queue(inv, (exchange, response), [message])

        self.host.run(self.path, headers, body, done)

    def _queue(
        self,
        inv: Invocation,
        failed: tuple[Exchange, Response] | None,
        messages: list[Message],
    ) -> None:
        future = asyncio.ensure_future(self.host.queue(inv, failed))

        def stored(f: asyncio.Future[Any]) -> None:
            ok = not f.cancelled() and f.exception() is None
            if ok:
                self.queued += len(messages)
            else:
                self.failed += len(messages)
                log.error(
                    "trigger %s of %s: an event could not be queued (%s); the broker keeps it",
                    self.name,
                    self.function,
                    "cancelled" if f.cancelled() else f.exception(),
                )
            for message in messages:
                self._settle(message, ok)

        future.add_done_callback(stored)

    def _settle(self, message: Message, ok: bool) -> None:
        """Acknowledge (or give back) a message; once that is sent, room for the next one."""
        self._acks.append((ok, message))
        if self._acking is None or self._acking.done():
            self._acking = self.loop.create_task(self._ack_loop())
        if id(message) in self._ordered:
            self._ordered.discard(id(message))
            self._next_in_order(message)

    async def _ack_loop(self) -> None:
        """Acks in one task, in the order they were settled (no task per message)."""
        while self._acks and (source := self.source) is not None:
            acks, self._acks = self._acks, []
            for ok, message in acks:
                try:
                    await (source.ack(message) if ok else source.nack(message))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the broker will send it again: at least once
                    log.warning("trigger %s of %s: ack failed: %s", self.name, self.function, exc)
                self.held.pop(id(message), None)
                self._room.set()
        self._acks.clear()  # stopped: the broker sends them again

    # ---- order per key ----
    def _key(self, message: Message) -> str:
        by = self.delivery.order_by
        return message.key if by == "key" else message.event.attribute(by)

    def _in_order(self, message: Message) -> None:
        key = self._key(message)
        waiting = self._busy.get(key)
        self._ordered.add(id(message))
        if waiting is not None:
            waiting.append(message)
            return
        self._busy[key] = deque()
        self._deliver(message)

    def _next_in_order(self, settled: Message) -> None:
        key = self._key(settled)
        waiting = self._busy.get(key)
        if waiting is None:
            return
        if waiting:
            self._deliver(waiting.popleft())
        else:
            del self._busy[key]

    # ---- batches ----
    def _add_to_batch(self, message: Message) -> None:
        self._batch.append(message)
        if len(self._batch) >= self.delivery.batch_size:
            self._flush()
        elif self._batch_timer is None:
            self._batch_timer = self.loop.call_later(self.delivery.batch_wait, self._flush)

    def _flush(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        messages, self._batch = self._batch, []
        if not messages:
            return
        headers, body = envelope.batch([m.event for m in messages])

        def done(exchange: Exchange, response: Response) -> None:
            failed = _failed_ids(response) if response.status < 300 else None
            for message in messages:
                if failed is not None and message.event.id not in failed:
                    self.delivered += 1
                    self._settle(message, True)
                else:  # one by one through the queue: the others are not sent again
                    single, data = envelope.binary(message.event)
                    inv = self.host.invocation(self.function, self.path, single, data)
                    self._queue(inv, None, [message])

        self.host.run(self.path, headers, body, done)

    # ---- state ----
    def _set(self, state: str, error: str) -> None:
        if state != self.state or error != self.error:
            self.state, self.error, self.since = state, error, time.time()

    def statistics(self) -> Statistics:
        now = time.time()
        oldest = min((m.received for m in self.held.values()), default=0.0)
        if self.pending_oldest:
            oldest = min(oldest or now, self.pending_oldest)
        return Statistics(
            self.state,
            self.error,
            self.since,
            self.delivered,
            self.queued,
            self.failed,
            self.filtered,
            len(self.held) + max(self.pending, 0),
            now - oldest if oldest else 0.0,
        )


def _failed_ids(response: Response) -> set[str]:
    """A batch's answer: 2xx with an optional JSON body `{"failed": [event ids]}`; the ids
    listed are queued one by one (and retried), the others are done."""
    if not response.body.strip():
        return set()
    try:
        answer = _batch_results.decode(response.body)
    except msgspec.DecodeError:
        return set()
    failed = answer.get("failed", [])
    return {str(i) for i in failed} if isinstance(failed, list) else set()
