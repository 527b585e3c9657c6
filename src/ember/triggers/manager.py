"""Every trigger of the server: kept in the store, started with the server and on deploy,
paused, resumed, and stopped when its function goes. It is also each trigger's `Host`: how an
event reaches the function (`Gateway.run`) or the durable queue (the dispatcher)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from ember.errors import BadTrigger, Conflict, NotFound
from ember.gateway import rules
from ember.gateway.app import Exchange, Gateway, Response
from ember.queue.base import QUEUED, Invocation
from ember.queue.dispatcher import Dispatcher
from ember.spec import TriggerSpec
from ember.triggers.base import TriggerError
from ember.triggers.plan import Plan, describe, plan
from ember.triggers.records import API, MANIFEST, Records, TriggerRecord
from ember.triggers.runner import FAILING, PAUSED, STARTING, Statistics, Trigger

log = logging.getLogger("ember.triggers")
CHECK_TIMEOUT = 5.0  # s for a source to reach its broker at deploy
_SECRET_KEYS = ("secret", "password", "token")


class View(msgspec.Struct, frozen=True):
    """A trigger as the API shows it (`ember triggers ls`)."""

    id: str
    function: str
    name: str
    type: str
    origin: str
    config: dict[str, Any]
    filter: list[Any]
    delivery: dict[str, Any]
    state: str
    error: str
    since: float
    delivered: int
    queued: int
    failed: int
    filtered: int
    lag: int
    oldest_age: float
    hook: str


class _Entry:
    __slots__ = ("error", "record", "since", "trigger")

    def __init__(self, record: TriggerRecord) -> None:
        self.record = record
        self.trigger: Trigger | None = None
        self.error = ""  # why it cannot run (a bad setting kept by --allow-trigger-errors)
        self.since = time.time()


class Triggers:
    def __init__(self, records: Records, gateway: Gateway, dispatcher: Dispatcher) -> None:
        self.records = records
        self.gateway = gateway
        self.dispatcher = dispatcher
        self.entries: dict[tuple[str, str], _Entry] = {}
        self.lock = asyncio.Lock()  # one change at a time
        self.stopping = False

    # ---- the server's life ----
    async def start(self) -> None:
        """After the functions are routed and the queue is open: every stored trigger."""
        for record in await self.records.triggers():
            entry = self.entries[(record.function, record.name)] = _Entry(record)
            await self._run(entry)

    async def stop(self) -> None:
        """First thing at shutdown: no more events are read; what is held goes back."""
        self.stopping = True
        await asyncio.gather(*(self._halt(e, PAUSED) for e in self.entries.values()))

    # ---- deploy ----
    async def check(self, function: str, specs: Sequence[TriggerSpec], allow_errors: bool) -> None:
        """Before a deploy commits: every trigger valid and its broker reachable, or 422
        naming the trigger and the key (unless `allow_errors`: it deploys, failing)."""
        taken = {
            name
            for (fn, name), e in self.entries.items()
            if fn == function and e.record.origin == API
        }
        problems = [
            f"trigger {spec.name!r} is the name of one added with ember triggers add; rename one"
            for spec in specs
            if spec.name in taken
        ]
        if not allow_errors:  # (one running as declared is not reached again)
            fresh = [s for s in specs if not self._running_as(function, s)]
            problems += [p for p in await asyncio.gather(*map(_problem, fresh)) if p]
        if problems:
            raise BadTrigger(f"function '{function}': " + "; ".join(problems) + _ALLOW)

    def _running_as(self, function: str, spec: TriggerSpec) -> bool:
        entry = self.entries.get((function, spec.name))
        return entry is not None and entry.trigger is not None and entry.record.spec == spec

    async def apply(self, function: str, specs: Sequence[TriggerSpec]) -> None:
        """After a deploy stored the function: its ember.yaml triggers become these. One whose
        spec did not change keeps running untouched (no event dropped or doubled)."""
        async with self.lock:
            wanted = {spec.name: spec for spec in specs}
            for (fn, name), entry in list(self.entries.items()):
                if fn == function and entry.record.origin == MANIFEST and name not in wanted:
                    await self._remove(entry)
            for spec in specs:
                await self._put(function, spec, MANIFEST)

    async def forget(self, function: str) -> None:
        """The function was removed (its records went with it in the store)."""
        async with self.lock:
            for key, entry in list(self.entries.items()):
                if key[0] == function:
                    del self.entries[key]
                    await self._halt(entry, PAUSED)

    # ---- ember triggers add / rm / pause / resume ----
    async def add(self, function: str, spec: TriggerSpec, allow_errors: bool) -> View:
        async with self.lock:
            if (function, spec.name) in self.entries:
                raise Conflict(
                    f"function '{function}' has a trigger named {spec.name!r}; choose another "
                    "name, or remove that one first (ember triggers rm)",
                    code="trigger_exists",
                )
            if not allow_errors and (problem := await _problem(spec)):
                raise BadTrigger(f"function '{function}': {problem}{_ALLOW}")
            return self._view(await self._put(function, spec, API))

    async def remove(self, function: str, name: str) -> None:
        async with self.lock:
            entry = self.require(function, name)
            if entry.record.origin == MANIFEST:
                raise Conflict(
                    f"trigger {name!r} of '{function}' is declared in its ember.yaml; remove it "
                    "there and deploy again (or pause it: ember triggers pause)",
                    code="trigger_declared",
                )
            await self._remove(entry)

    async def pause(self, function: str, name: str, paused: bool) -> View:
        async with self.lock:
            entry = self.require(function, name)
            if entry.record.paused != paused:
                entry.record = msgspec.structs.replace(entry.record, paused=paused)
                await self.records.put_trigger(entry.record)
                await (self._halt(entry, PAUSED) if paused else self._run(entry))
            return self._view(entry)

    def require(self, function: str, name: str) -> _Entry:
        entry = self.entries.get((function, name))
        if entry is None:
            raise NotFound(
                f"function '{function}' has no trigger named {name!r}; see ember triggers ls",
                code="trigger_not_found",
            )
        return entry

    def views(self, functions: Callable[[str], bool]) -> list[View]:
        return [self._view(e) for (fn, _), e in sorted(self.entries.items()) if functions(fn)]

    def view(self, function: str, name: str) -> View:
        return self._view(self.require(function, name))

    def by_id(self, id: str) -> Trigger | None:
        """A running trigger by id (a webhook's /hooks/{id})."""
        for entry in self.entries.values():
            if entry.record.id == id:
                return entry.trigger
        return None

    def statistics(self) -> list[tuple[str, str, Statistics]]:
        return [
            (fn, name, e.trigger.statistics())
            for (fn, name), e in self.entries.items()
            if e.trigger is not None
        ]

    # ---- running them ----
    async def _put(self, function: str, spec: TriggerSpec, origin: str) -> _Entry:
        entry = self.entries.get((function, spec.name))
        if entry is not None and entry.record.spec == spec and entry.record.origin == origin:
            return entry
        record = TriggerRecord(
            id=entry.record.id if entry else _new_id(),
            function=function,
            name=spec.name,
            origin=origin,
            spec=spec,
            paused=entry.record.paused if entry else False,
            created=entry.record.created if entry else time.time(),
        )
        await self.records.put_trigger(record)
        if entry is not None:
            await self._halt(entry, PAUSED)
        entry = self.entries[(function, spec.name)] = _Entry(record)
        await self._run(entry)
        return entry

    async def _remove(self, entry: _Entry) -> None:
        record = entry.record
        self.entries.pop((record.function, record.name), None)
        await self._halt(entry, PAUSED)
        await self.records.delete_trigger(record.function, record.name)

    async def _run(self, entry: _Entry) -> None:
        if entry.record.paused or self.stopping:
            return
        try:
            planned: Plan = plan(entry.record.spec)
        except TriggerError as exc:
            entry.error, entry.since = describe(entry.record.spec, exc), time.time()
            return
        entry.error = ""
        trigger = Trigger(entry.record.id, entry.record.function, entry.record.name, planned, self)
        entry.trigger = trigger
        try:
            await trigger.start()
        except Exception as exc:  # a connector's bug: this trigger fails, not the server
            log.exception(
                "trigger %s of %s did not start", entry.record.name, entry.record.function
            )
            trigger.failing(f"it did not start: {type(exc).__name__}: {exc}")

    async def _halt(self, entry: _Entry, state: str) -> None:
        trigger, entry.trigger = entry.trigger, None
        if trigger is not None:
            try:
                await trigger.stop(state)
            except Exception:
                log.exception("stopping trigger %s of %s", entry.record.name, entry.record.function)

    def _view(self, entry: _Entry) -> View:
        record, spec = entry.record, entry.record.spec
        stats = entry.trigger.statistics() if entry.trigger is not None else None
        if stats is None:
            state = PAUSED if record.paused else (FAILING if entry.error else STARTING)
            stats = Statistics(state, entry.error, entry.since, 0, 0, 0, 0, 0, 0.0)
        return View(
            id=record.id,
            function=record.function,
            name=record.name,
            type=spec.type,
            origin=record.origin,
            config={
                k: "***" if k in _SECRET_KEYS else _hide_password(v) for k, v in spec.config.items()
            },
            filter=spec.filter,
            delivery=spec.delivery,
            state=stats.state,
            error=stats.error,
            since=stats.since,
            delivered=stats.delivered,
            queued=stats.queued,
            failed=stats.failed,
            filtered=stats.filtered,
            lag=stats.lag,
            oldest_age=round(stats.oldest_age, 3),
            hook=f"/hooks/{record.id}" if spec.type == "webhook" else "",
        )

    # ---- the Host of each trigger ----
    def run(
        self,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        done: Callable[[Exchange, Response], None],
    ) -> None:
        self.gateway.run("POST", path, path.encode(), b"", headers, body, True, "", 0, done)

    def invocation(
        self, function: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Invocation:
        now = time.time()
        return Invocation(
            id=rules.request_id(),
            function=function,
            method="POST",
            path=path,
            raw_path=path,
            query=b"",
            headers=headers,
            body=body,
            accepted=now,
            authorized=True,  # a trigger is set up by whoever may deploy the function
            status=QUEUED,
            not_before=now,
        )

    def queue(self, inv: Invocation, failed: tuple[Exchange, Response] | None) -> Awaitable[Any]:
        if failed is not None:
            return self.dispatcher.adopt(inv, *failed)
        return self.dispatcher.enqueue(inv)

    async def load_state(self, trigger_id: str) -> bytes:
        return await self.records.trigger_state(trigger_id)

    async def save_state(self, trigger_id: str, state: bytes) -> None:
        await self.records.set_trigger_state(trigger_id, state)


_ALLOW = " (ember deploy --allow-trigger-errors deploys anyway and shows the trigger failing)"


async def _problem(spec: TriggerSpec) -> str:
    """What is wrong with a trigger, reaching its broker too; "" if nothing."""
    try:
        planned = plan(spec)
        source = planned.source(dict(planned.config), _Probe(spec.name))
        await asyncio.wait_for(source.check(), CHECK_TIMEOUT)
    except TriggerError as exc:
        return describe(spec, exc)
    except TimeoutError:
        return describe(
            spec, TriggerError("", f"its broker did not answer within {CHECK_TIMEOUT:g} s")
        )
    return ""


class _Probe:
    """The `Events` of a source that is only checked, never started."""

    def __init__(self, name: str) -> None:
        self.id, self.function, self.name = "check-" + _new_id(), "", name
        self.room = 0

    async def put(self, message: object) -> None:
        raise RuntimeError("a checked source does not read")

    async def free(self) -> int:
        raise RuntimeError("a checked source does not read")

    def connected(self) -> None: ...

    def failing(self, error: str) -> None: ...

    def backlog(self, pending: int, oldest: float = 0.0) -> None: ...

    async def load_state(self) -> bytes:
        return b""

    async def save_state(self, state: bytes) -> None: ...


def _new_id() -> str:
    return "tr" + os.urandom(10).hex()


def _hide_password(value: object) -> object:
    """user:password@ in a URL shown as user:***@."""
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, _, rest = value.partition("://")
        credentials, at, host = rest.rpartition("@")
        if ":" in credentials:
            return f"{scheme}://{credentials.partition(':')[0]}:***{at}{host}"
    return value
