"""Async invocations from the 202 to their end.

`Dispatcher.accept` takes an ACCEPT exchange from the gateway (routed, authorized, body
whole), stores the invocation and answers 202 once the queue says it is durable. Each
function with queued work has a `Lane`: a task that takes due invocations while the function
has room (its `async.concurrency`, and a free instance or a start within `scale.max` with no
synchronous call waiting), and runs each attempt through `Gateway.run`, the path a
synchronous request takes. When an attempt ends, `policy.after` decides: succeeded, failed,
a retry at a later time, dead or expired; the new state is saved and, if it ended, its
callback and destinations are sent (`notify.py`). Lanes are independent, so one function's
backlog never holds up another's. Every second a tick reads the backlog (for /metrics, the
autoscaler, and lanes whose retries came due) and, every minute, prunes what ended before
the retention.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import urllib.parse
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import msgspec

from ember.errors import PlatformError, UserError
from ember.gateway import rules
from ember.gateway.app import Exchange, Gateway, Response
from ember.gateway.router import Route
from ember.queue import policy
from ember.queue.base import (
    CANCELLED,
    QUEUED,
    RUNNING,
    Attempt,
    Backlog,
    Invocation,
    Queue,
    Result,
)
from ember.queue.notify import Notifier
from ember.spec import AsyncSpec

log = logging.getLogger("ember.queue")
T = TypeVar("T")

BATCH = 64  # invocations one take asks for at most
AHEAD = 2  # rounds of its concurrency a lane takes ahead (at most BATCH)
TICK = 1.0  # seconds between backlog reads
PRUNE_EVERY = 60.0
BLOCKED_POLL = 0.01  # seconds between looks at a revision that had no free capacity
MAX_KEY = 256  # bytes of an Idempotency-Key
RECORD_OVERHEAD = 64 * 1024  # bytes of a stored invocation beside its body and its result's
MAX_URL = 2048
_DEFAULT = AsyncSpec()
_json = msgspec.json.Encoder()


def callback_url(value: bytes) -> str:
    """X-Callback-Url, checked: an absolute http(s) URL with a host, or 400."""
    text = value.decode("latin-1").strip()
    parts = urllib.parse.urlsplit(text) if len(text) <= MAX_URL else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() or ord(c) < 32 for c in text)
    ):
        raise UserError(
            f"X-Callback-Url {text[:200]!r} is not an absolute http:// or https:// URL with a "
            f"host (at most {MAX_URL} characters); send e.g. X-Callback-Url: "
            "https://example.com/done",
            code="bad_callback_url",
        )
    return text


def idempotency_key(value: bytes) -> str:
    if not value or len(value) > MAX_KEY:
        raise UserError(
            f"Idempotency-Key must be 1-{MAX_KEY} bytes, got {len(value)}",
            code="bad_idempotency_key",
        )
    return value.decode("latin-1")


def _ignore(result: object, error: BaseException | None) -> None:
    if error is not None:
        log.error("saving an invocation at stop failed", exc_info=error)


def async_spec(route: Route | None) -> AsyncSpec:
    return route.main.spec.async_ if route is not None else _DEFAULT


def lane_limit(route: Route) -> int:
    """Async invocations of the function running at once: `async.concurrency`, at most what
    `scale.max` instances hold."""
    spec = route.main.spec
    cap = spec.scale.max * spec.concurrency
    wanted = spec.async_.concurrency
    return min(wanted, cap) if wanted else cap


class Lane:
    """One function's queued work, driven by callbacks (no task of its own): `kick` schedules
    one `_step` on the loop, however many kicks come before it runs. A step begins what is
    ready while the function has room, and takes more when it runs low. It keeps up to two
    rounds of its concurrency taken ahead (`ready`: running in the queue, not yet begun),
    taken in the background, so a take's round trip to the queue (a group commit) is not
    between one attempt's end and the next one's start."""

    def __init__(self, dispatcher: Dispatcher, function: str) -> None:
        self.dispatcher = dispatcher
        self.function = function
        self.loop = dispatcher.loop
        self.inflight = 0
        self.ready: deque[Invocation] = deque()
        self.more = True  # the queue may hold due work (a take came back short: no)
        self.puts = 0  # wakes for new work, so a short take racing one does not clear `more`
        self.due_at: float | None = None  # when its earliest invocation not yet due comes due
        self.scheduled = False
        self.timer: asyncio.TimerHandle | None = None
        self.taking: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        return not (self.inflight or self.ready or self.taking or self.due_at is not None)

    def kick(self, more: bool = False) -> None:
        if more:
            self.more, self.puts = True, self.puts + 1
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._step)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.taking is not None:
            self.taking.cancel()

    def _step(self) -> None:
        self.scheduled = False
        d = self.dispatcher
        if d.stopping:
            return
        try:
            route = d.gateway.routes.get(self.function)
            room, blocked = self._room(route)
            while room > 0 and self.ready:
                room -= self._begin(self.ready.popleft(), route)
            limit = lane_limit(route) if route is not None else BATCH
            if self.more and self.taking is None and len(self.ready) < limit:
                ahead = min(BATCH, AHEAD * limit) - len(self.ready)
                self.taking = self.loop.create_task(self._take(ahead))
            if blocked and self.ready:  # capacity frees without telling us: look again soon
                self._wake_at(self.loop.time() + BLOCKED_POLL)
            elif self.due_at is not None:
                self._wake_at(self.loop.time() + max(0.0, self.due_at - time.time()))
        except Exception:
            log.exception("the async lane of %s failed; the next tick kicks it", self.function)

    def _wake_at(self, when: float) -> None:
        if self.timer is not None:
            if self.timer.when() <= when:
                return
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self._timed)

    def _timed(self) -> None:
        self.timer = None
        if self.due_at is not None and time.time() >= self.due_at:
            self.more, self.due_at = True, None  # a retry came due
        self.kick()

    async def _take(self, n: int) -> None:
        d, puts = self.dispatcher, self.puts
        try:
            batch = await d.queue.take(self.function, n)
            self.ready.extend(batch)
            if len(batch) < n and self.puts == puts:
                self.more = False
                self.due_at = await d.queue.next_due(self.function)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("taking async invocations of %s failed", self.function)
        finally:
            self.taking = None
            self.kick()

    def _room(self, route: Route | None) -> tuple[int, bool]:
        """How many more may start now, and whether the revision's capacity (not the lane's
        limit) is what stops them."""
        if route is None:  # removed: what is left runs, and ends as 404
            return BATCH - self.inflight, False
        room = lane_limit(route) - self.inflight
        if room <= 0:
            return 0, False
        if not self.dispatcher.gateway.pool.open_revision(route.main).has_room():
            return 0, True
        return room, False

    def _begin(self, inv: Invocation, route: Route | None) -> int:
        """Start its next attempt (1), or expire it (0)."""
        d = self.dispatcher
        spec = async_spec(route)
        now = time.time()
        if policy.expired(spec, inv, now):
            d.end(inv, policy.expiry(spec), now, spec)
            return 0
        number = len(inv.attempts) + 1
        self.inflight += 1
        headers = [
            *inv.headers,
            (b"x-call-id", inv.id.encode()),
            (b"x-ember-attempt", str(number).encode()),
        ]

        def done(exchange: Exchange, response: Response) -> None:
            self.inflight -= 1
            self.kick()
            d.attempted(inv, number, exchange, response)

        d.gateway.run(
            inv.method,
            inv.path,
            inv.raw_path.encode("latin-1"),
            inv.query,
            headers,
            inv.body,
            inv.authorized,
            inv.id,
            number,
            done,
        )
        return 1


class Dispatcher:
    """The gateway's `AsyncSink`, the lanes, and the tick."""

    def __init__(self, queue: Queue, gateway: Gateway, retention: float) -> None:
        self.queue = queue
        self.gateway = gateway
        self.retention = retention
        self.lanes: dict[str, Lane] = {}
        self.backlogs: dict[str, Backlog] = {}
        self.counts: Counter[tuple[str, str]] = Counter()  # (function, accepted|status)
        self.notifier = Notifier(queue, self.enqueue)
        self.stopping = False
        self.opened = False
        self.loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._sending: set[asyncio.Task[None]] = set()  # callbacks and destinations
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.queue.open()
        except Exception as exc:
            raise PlatformError(
                f"the {self.queue.name} queue of async invocations could not be opened "
                f"({type(exc).__name__}: {exc}); check ember up --queue, or leave it out for "
                "SQLite in EMBER_HOME",
                code="queue_unavailable",
            ) from exc
        self.opened = True
        if self.queue.max_record:  # a body and a result must fit in one stored record
            fits = (self.queue.max_record - RECORD_OVERHEAD) // 2
            if fits < self.gateway.max_async_body:
                log.warning(
                    "the %s queue stores at most %d bytes per invocation (its max_payload): "
                    "async bodies and stored results are limited to %d bytes; raise the "
                    "server's max_payload for larger ones",
                    self.queue.name,
                    self.queue.max_record,
                    fits,
                )
                self.gateway.max_async_body = fits
        self.gateway.sink = self
        for inv in await self.queue.unsent():  # ended before a stop, not yet reported
            self._send(inv, async_spec(self.gateway.routes.get(inv.function)))
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    def stop_taking(self) -> None:
        """The server is stopping: no new attempts (what runs may finish: `drain`)."""
        if self.stopping:
            return
        self.stopping = True
        self.gateway.sink = None
        if self._ticker is not None:
            self._ticker.cancel()
        for lane in self.lanes.values():
            lane.stop()

    async def drain(self, until: float) -> None:
        """Wait (until the loop's clock reads `until`) for the attempts under way to end."""
        loop = asyncio.get_running_loop()
        while any(lane.inflight for lane in self.lanes.values()) and loop.time() < until:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        """After the pool stopped: the attempts' saves written, what lanes had taken but not
        begun queued again as it was, then the queue closed."""
        for lane in self.lanes.values():
            while lane.ready:
                inv = lane.ready.popleft()
                inv.status = QUEUED
                self._follow(self.queue.save(inv), _ignore)
        for sending in self._sending:  # still marked to send: the next start sends them
            sending.cancel()
        while pending := [t for t in self._tasks if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
        await self.notifier.close()
        if self.opened:
            await self.queue.close()

    # ---- accepting (the gateway's AsyncSink) ----
    def accept(self, exchange: Exchange) -> None:
        callback = key = ""
        for name, value in exchange.headers:
            if name == b"x-callback-url":
                callback = callback_url(value)
            elif name == b"idempotency-key":
                key = idempotency_key(value)
        inv = Invocation(
            id=exchange.rid,
            function=exchange.key,
            method=exchange.method,
            path=exchange.path,
            raw_path=exchange.raw_path.decode("latin-1"),
            query=exchange.query,
            headers=exchange.headers,
            body=exchange.chunks[0] if len(exchange.chunks) == 1 else b"".join(exchange.chunks),
            accepted=exchange.started,
            authorized=exchange.authorized,
            callback=callback,
            idempotency_key=key,
            not_before=exchange.started,
        )
        self._follow(self.queue.put(inv), functools.partial(self._accepted, exchange, inv))

    def _accepted(
        self,
        exchange: Exchange,
        inv: Invocation,
        stored: Invocation | None,
        exc: BaseException | None,
    ) -> None:
        """The put is durable (or failed): answer the request."""
        if stored is None:
            log.error(
                "storing async invocation %s of %s failed",
                inv.id,
                inv.function,
                exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None,
            )
            error = PlatformError(
                f"the invocation could not be queued ({type(exc).__name__}); nothing was "
                "stored, retry later",
                code="queue_unavailable",
                headers={"Retry-After": "1"},
            )
            exchange.failed(error)
            return
        exchange.close()
        fresh = stored.id == inv.id
        if fresh:
            self.counts[(inv.function, "accepted")] += 1
            self.wake(inv.function)
        headers = [
            (b"content-type", b"application/json"),
            (b"location", f"/api/v1/invocations/{stored.id}".encode()),
            (b"x-call-id", stored.id.encode()),
        ]
        if not fresh:
            headers.append((b"x-ember-idempotent-replay", b"true"))
        body = _json.encode({"id": stored.id, "status": stored.status})
        exchange.reply(Response(202, headers + exchange._ember_headers(""), body))

    async def enqueue(self, inv: Invocation) -> Invocation:
        """Queue an invocation Ember makes itself (a destination's); returns what was stored."""
        stored = await self.queue.put(inv)
        self.counts[(inv.function, "accepted")] += 1
        self.wake(inv.function)
        return stored

    def _held(self, inv: Invocation) -> Invocation | None:
        """The lane's own copy of an invocation it took ahead and has not begun."""
        lane = self.lanes.get(inv.function)
        return next((held for held in lane.ready if held.id == inv.id), None) if lane else None

    def shown(self, inv: Invocation) -> Invocation:
        """The invocation as callers see it: taken ahead is still queued to them."""
        if inv.status == RUNNING and self._held(inv) is not None:
            inv.status = QUEUED
        return inv

    async def cancel(self, inv: Invocation) -> Invocation | None:
        """Cancel it if no attempt of it has begun; None (nothing changed) otherwise."""
        now = time.time()
        cancelled = await self.queue.cancel(inv.id, now)
        held = self._held(inv) if cancelled is None else None
        if held is not None:
            self.lanes[inv.function].ready.remove(held)
            held.status, held.ended, held.reason = CANCELLED, now, "cancelled before it ran"
            await self.queue.save(held)
            cancelled = held
        if cancelled is not None:
            self.counts[(inv.function, CANCELLED)] += 1
        return cancelled

    def wake(self, function: str) -> None:
        """New or newly due work for the function's lane."""
        if self.stopping:
            return
        lane = self.lanes.get(function)
        if lane is None:
            lane = self.lanes[function] = Lane(self, function)
        lane.kick(more=True)

    # ---- attempts ----
    def attempted(self, inv: Invocation, number: int, ex: Exchange, response: Response) -> None:
        """An attempt's answer: recorded in the invocation, and its next step taken."""
        step, spec, now = self._decide(inv, number, ex, response)
        if step.status == QUEUED:
            inv.status, inv.not_before = QUEUED, step.not_before
            self._save(inv, spec)
        else:
            self.end(inv, step, now, spec)

    async def adopt(self, inv: Invocation, ex: Exchange, response: Response) -> Invocation:
        """An event a trigger ran at once (`ex`, its first attempt) that did not succeed:
        stored with that attempt, then retried, or ended (failed, dead), as the function's
        `async:` settings say, exactly as if it had been queued first. Returns once durable."""
        step, spec, now = self._decide(inv, 1, ex, response)
        if step.status == QUEUED:
            inv.status, inv.not_before = QUEUED, step.not_before
        else:
            inv.status, inv.reason, inv.ended = step.status, step.reason, now
            inv.notify = self.notifier.wanted(inv, spec)
        stored = await self.queue.put(inv)
        self.counts[(inv.function, "accepted")] += 1
        if stored.status == QUEUED:
            self.wake(inv.function)
        elif stored is inv:
            self.counts[(inv.function, inv.status)] += 1
            if inv.notify:
                self._send(inv, spec)
        return stored

    def _decide(
        self, inv: Invocation, number: int, ex: Exchange, response: Response
    ) -> tuple[policy.Step, AsyncSpec, float]:
        """The attempt appended to `inv` (and its answer kept), and what comes next."""
        now = time.time()
        kind = policy.outcome(response.status, ex.error)
        if self.stopping and kind != "ok" and ex.error in ("platform", "internal"):
            kind = "interrupted"  # the server's stop ended it, not the function
        inv.attempts.append(
            Attempt(
                number=number,
                request_id=ex.rid,
                started=ex.started,
                duration_ms=(time.perf_counter() - ex.t0) * 1000.0,
                status=response.status,
                outcome=kind,
                error=ex.error,
            )
        )
        inv.result = self._result(response)
        spec = async_spec(self.gateway.routes.get(inv.function))
        if kind == "interrupted":
            return policy.Step(QUEUED, now, ""), spec, now
        asked = policy.retry_after(rules.header(response.headers, b"retry-after"), now)
        return (
            policy.after(spec, inv, kind, response.status, asked, now, random.random()),
            spec,
            now,
        )

    def _result(self, response: Response) -> Result:
        """The answer as it is kept: a body beyond the async body limit is cut there, and
        `X-Ember-Result-Truncated` says how long it was."""
        limit = self.gateway.max_async_body
        if len(response.body) <= limit:
            return Result(response.status, response.headers, response.body)
        cut = (b"x-ember-result-truncated", str(len(response.body)).encode())
        return Result(response.status, [*response.headers, cut], response.body[:limit])

    def end(self, inv: Invocation, step: policy.Step, now: float, spec: AsyncSpec) -> None:
        inv.status, inv.reason, inv.ended = step.status, step.reason, now
        inv.notify = self.notifier.wanted(inv, spec)
        self._save(inv, spec)

    def _save(self, inv: Invocation, spec: AsyncSpec) -> None:
        self._follow(self.queue.save(inv), functools.partial(self._saved, inv, spec))

    def _saved(self, inv: Invocation, spec: AsyncSpec, _: None, exc: BaseException | None) -> None:
        if exc is not None:  # it stays running in the store: the next start runs it again
            log.error(
                "saving async invocation %s of %s failed",
                inv.id,
                inv.function,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        elif inv.status == QUEUED:
            self.wake(inv.function)
        else:  # counted once stored: /metrics never says more ended than the API shows
            self.counts[(inv.function, inv.status)] += 1
            if inv.notify:
                self._send(inv, spec)

    def _follow(
        self, pending: Awaitable[T], then: Callable[[T | None, BaseException | None], None]
    ) -> None:
        """Call `then(result, None)` or `then(None, error)` when `pending` is done; kept so
        `close` waits for it. A backend's future costs no task; a coroutine gets one."""
        future = asyncio.ensure_future(pending)
        self._tasks.add(future)

        def done(f: asyncio.Future[T]) -> None:
            self._tasks.discard(f)
            if f.cancelled():
                then(None, asyncio.CancelledError())
            elif (error := f.exception()) is not None:
                then(None, error)
            else:
                then(f.result(), None)

        future.add_done_callback(done)

    def _send(self, inv: Invocation, spec: AsyncSpec) -> None:
        """Its callback and destination, in a task a stop may cancel (they stay marked)."""
        task = self.loop.create_task(self.notifier.send(inv, spec))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the tick: backlog, autoscaler, pruning ----
    async def _tick_loop(self) -> None:
        pruned = time.monotonic()
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.tick()
                if time.monotonic() - pruned > min(PRUNE_EVERY, self.retention / 2):
                    await self.queue.prune(time.time() - self.retention)
                    pruned = time.monotonic()
            except Exception:
                log.exception("the async queue's tick failed")

    async def tick(self) -> None:
        backlogs = await self.queue.backlog()
        for function, lane in self.lanes.items():  # what a lane took ahead waits too
            if lane.ready:
                stored = backlogs.get(function, Backlog(0, 0.0))
                oldest = min(inv.accepted for inv in lane.ready)
                if stored.depth:
                    oldest = min(oldest, stored.oldest)
                backlogs[function] = Backlog(stored.depth + len(lane.ready), oldest)
        self.backlogs = backlogs
        pool = self.gateway.pool
        for function in backlogs:  # a new lane, or one whose retries came due
            self.wake(function)
        for function in list(self.lanes):
            lane = self.lanes[function]
            route = self.gateway.routes.get(function)
            depth = backlogs[function].depth if function in backlogs else 0
            if route is not None:
                pool.set_backlog(route.main, min(depth, max(0, lane_limit(route) - lane.inflight)))
            if not depth and lane.idle:
                del self.lanes[function]

    def statistics(self) -> list[tuple[str, int, float, dict[str, int]]]:
        """Per function: queue depth, age of its oldest queued invocation (s), and counts of
        accepted and ended invocations since the server started."""
        now = time.time()
        functions = {f for f, _ in self.counts} | set(self.backlogs)
        out = []
        for function in sorted(functions):
            backlog = self.backlogs.get(function, Backlog(0, 0.0))
            counts = {what: n for (f, what), n in self.counts.items() if f == function}
            age = now - backlog.oldest if backlog.depth else 0.0
            out.append((function, backlog.depth, max(0.0, age), counts))
        return out

    def forget(self, function: str) -> None:
        """`ember rm`: its invocations, queued or ended, and its counters go."""
        for key in [k for k in self.counts if k[0] == function]:
            del self.counts[key]
        self.backlogs.pop(function, None)
        self._spawn(self._forget(function))

    async def _forget(self, function: str) -> None:
        try:
            await self.queue.forget(function)
        except Exception:
            log.exception("forgetting the async invocations of %s failed", function)
