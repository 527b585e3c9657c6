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
import contextlib
import logging
import random
import time
import urllib.parse
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import msgspec

from ember.errors import PlatformError, UserError
from ember.gateway import rules
from ember.gateway.app import Exchange, Gateway, Response
from ember.gateway.router import Route
from ember.queue import policy
from ember.queue.base import (
    QUEUED,
    Attempt,
    Backlog,
    Invocation,
    Queue,
    Result,
)
from ember.queue.notify import Notifier
from ember.spec import AsyncSpec

log = logging.getLogger("ember.queue")

BATCH = 64  # invocations one take asks for at most
TICK = 1.0  # seconds between backlog reads
PRUNE_EVERY = 60.0
BLOCKED_POLL = 0.01  # seconds between looks at a revision that had no free capacity
MAX_WAIT = 5.0  # a lane looks at its queue at least this often while it has work
MIN_WAIT = 0.002  # ... and at most this often when nothing it took was due
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
    """One function's queued work: takes what is due while there is room, runs it."""

    def __init__(self, dispatcher: Dispatcher, function: str) -> None:
        self.dispatcher = dispatcher
        self.function = function
        self.inflight = 0
        self.kicked = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        self.kicked.set()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        d = self.dispatcher
        try:
            while not d.stopping:
                self.kicked.clear()
                route = d.gateway.routes.get(self.function)
                room, blocked = self._room(route)
                if room > 0:
                    batch = await d.queue.take(self.function, min(room, BATCH))
                    for inv in batch:
                        self._begin(inv, route)
                    if batch:
                        continue
                due = await d.queue.next_due(self.function)
                if due is None and self.inflight == 0 and not self.kicked.is_set():
                    return
                wait = MAX_WAIT
                if blocked:
                    wait = BLOCKED_POLL
                elif due is not None and room > 0:  # (due already: it was put meanwhile)
                    wait = min(MAX_WAIT, max(MIN_WAIT, due - time.time()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self.kicked.wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the async lane of %s failed; the next tick restarts it", self.function)

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

    def _begin(self, inv: Invocation, route: Route | None) -> None:
        d = self.dispatcher
        spec = async_spec(route)
        now = time.time()
        if policy.expired(spec, inv, now):
            d.end(inv, policy.expiry(spec), now, spec)
            return
        number = len(inv.attempts) + 1
        self.inflight += 1
        headers = [
            *inv.headers,
            (b"x-call-id", inv.id.encode()),
            (b"x-ember-attempt", str(number).encode()),
        ]

        def done(exchange: Exchange, response: Response) -> None:
            self.inflight -= 1
            self.kicked.set()
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
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.queue.open()
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
            self._spawn(self.notifier.send(inv, async_spec(self.gateway.routes.get(inv.function))))
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    def stop_taking(self) -> None:
        """The server is stopping: no new attempts (what runs finishes within the grace)."""
        self.stopping = True
        self.gateway.sink = None
        if self._ticker is not None:
            self._ticker.cancel()
        for lane in self.lanes.values():
            if lane.task is not None:
                lane.task.cancel()

    async def close(self) -> None:
        """After the pool stopped: the attempts' saves written, then the queue closed."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.notifier.close()
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
        self._spawn(self._accept(exchange, inv))

    async def _accept(self, exchange: Exchange, inv: Invocation) -> None:
        try:
            stored = await self.queue.put(inv)
        except Exception as exc:
            log.exception("storing async invocation %s of %s failed", inv.id, inv.function)
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

    def wake(self, function: str) -> None:
        if self.stopping:
            return
        lane = self.lanes.get(function)
        if lane is None:
            lane = self.lanes[function] = Lane(self, function)
        lane.kick()

    # ---- attempts ----
    def attempted(self, inv: Invocation, number: int, ex: Exchange, response: Response) -> None:
        """An attempt's answer: recorded in the invocation, and its next step taken."""
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
        route = self.gateway.routes.get(inv.function)
        spec = async_spec(route)
        if kind == "interrupted":
            step = policy.Step(QUEUED, now, "")
        else:
            asked = policy.retry_after(rules.header(response.headers, b"retry-after"), now)
            step = policy.after(spec, inv, kind, response.status, asked, now, random.random())
        if step.status == QUEUED:
            inv.status, inv.not_before = QUEUED, step.not_before
            self._spawn(self._save(inv))
        else:
            self.end(inv, step, now, spec)

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
        self.counts[(inv.function, inv.status)] += 1
        self._spawn(self._save(inv, spec))

    async def _save(self, inv: Invocation, spec: AsyncSpec | None = None) -> None:
        try:
            await self.queue.save(inv)
        except Exception:  # it stays running in the store: the next start runs it again
            log.exception("saving async invocation %s of %s failed", inv.id, inv.function)
            return
        if inv.status == QUEUED:
            self.wake(inv.function)
        elif inv.notify and spec is not None:
            await self.notifier.send(inv, spec)

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
                if time.monotonic() - pruned > PRUNE_EVERY:
                    await self.queue.prune(time.time() - self.retention)
                    pruned = time.monotonic()
            except Exception:
                log.exception("the async queue's tick failed")

    async def tick(self) -> None:
        self.backlogs = backlogs = await self.queue.backlog()
        pool = self.gateway.pool
        for function in backlogs:
            lane = self.lanes.get(function)
            if lane is None or lane.task is None or lane.task.done():
                self.wake(function)
        for function in list(self.lanes):
            lane = self.lanes[function]
            route = self.gateway.routes.get(function)
            depth = backlogs[function].depth if function in backlogs else 0
            if route is not None:
                pool.set_backlog(route.main, min(depth, max(0, lane_limit(route) - lane.inflight)))
            if not depth and not lane.inflight and (lane.task is None or lane.task.done()):
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
