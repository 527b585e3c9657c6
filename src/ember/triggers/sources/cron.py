"""Cron triggers: an event per tick of a schedule, with no broker behind it.

`schedule` is a 5-field cron expression (minute hour day-of-month month day-of-week), one of
the macros @hourly @daily @weekly @monthly @yearly, or `@every <duration>` (`10s`, `1m30s`,
`2h`; at least 1 s, counted from the trigger's creation). Expressions are read in `timezone`.

Across daylight-saving changes: a wall time the change skips runs once, at the end of the gap;
a wall time it repeats runs once (the first time), except in expressions whose hour field is a
wildcard (`0 * * * *`, `*/15 * * * *`), which follow elapsed time and run in both.

State (`Events.save_state`): the latest tick acknowledged, as `{"last": <unix seconds>}`; a first
start saves the start time, so ticks count from the trigger's creation. On start, a tick that
fell between the saved one and now was missed while the server was down: `catchup: true` runs
the latest such tick once (a tick that is acked is saved and never run again), otherwise it is
skipped. Ticks are handed over with `await events.put`, so a slow function delays the next
tick; a tick more than one period late when its turn comes is replaced by the latest one due
(never a burst of stale ticks). A nacked tick is put again `retry_after` seconds later unless a
later tick was acked or nacked in the meantime: only the latest failed tick is retried.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, cast
from zoneinfo import ZoneInfo

from croniter import croniter  # type: ignore[import-untyped]

from ember.triggers.base import Event, Events, Message, TriggerError, keep_connected, only

MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
}
FORMS = "5 fields (minute hour day-of-month month day-of-week), @hourly, @daily, @weekly, "
FORMS += "@monthly, @yearly or @every <duration> (e.g. @every 10s, @every 1m30s)"
DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
RANDOM = re.compile(r"(?<![a-z])[hr](?![a-z])", re.IGNORECASE)  # croniter's H and R extensions
DST_SHIFT = 3 * 3600  # more than any daylight-saving change moves the clock
WAKE = 30.0  # longest single sleep, so a changed wall clock is noticed


@dataclass(frozen=True)
class Plan:
    """A schedule, parsed: `every` seconds apart, or the 5-field expression `cron`."""

    every: int = 0
    cron: str = ""
    hour_wildcard: bool = False


@functools.lru_cache(maxsize=256)
def parse(schedule: str) -> Plan:
    """The schedule's plan; raises `TriggerError("schedule", ...)`."""
    text = " ".join(schedule.split())
    text = MACROS.get(text, text)
    if text.startswith("@every"):
        return Plan(every=_duration(text.removeprefix("@every").strip()))
    if text.startswith("@"):
        raise TriggerError("schedule", f"unknown macro {text!r}; use {FORMS}")
    fields = text.split(" ")
    if len(fields) != 5:
        raise TriggerError(
            "schedule",
            f"{text!r} has {len(fields)} fields; use {FORMS}. Seconds and years fields are "
            "not supported: for ticks under a minute use @every",
        )
    if RANDOM.search(text):
        raise TriggerError("schedule", f"{text!r}: random and hashed fields (H, R) are not allowed")
    try:
        croniter(text, datetime(2000, 1, 1, tzinfo=UTC)).get_next(float)
    except Exception as exc:  # croniter's errors name the problem; say which setting holds it
        raise TriggerError("schedule", f"{text!r} is not a valid cron expression ({exc})") from exc
    return Plan(cron=text, hour_wildcard=fields[1].startswith("*"))


def _duration(text: str) -> int:
    match = DURATION.fullmatch(text)
    if not text or match is None:
        raise TriggerError(
            "schedule", f"@every takes a duration like 10s, 1m30s or 2h, not {text!r}"
        )
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total < 1:
        raise TriggerError("schedule", f"@every {text} is shorter than the minimum of 1s")
    return total


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`; raises `TriggerError("timezone", ...)`."""
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise TriggerError(
            "timezone", f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin or UTC"
        ) from exc


def next_tick(schedule: str, tz: str, after: float) -> int:
    """The first tick strictly after `after` (unix seconds)."""
    plan = parse(schedule)
    if plan.every:
        return math.floor(after) + plan.every
    where = zone(tz)
    while True:
        tick = int(croniter(plan.cron, datetime.fromtimestamp(after, where)).get_next(float))
        # fold=1: the second pass through a wall time the clock went back over
        if plan.hour_wildcard or datetime.fromtimestamp(tick, where).fold == 0:
            return tick
        after = tick


def missed(schedule: str, tz: str, last: float, now: float) -> int | None:
    """The latest tick after `last` and no later than `now`, or None."""
    plan = parse(schedule)
    if plan.every:
        periods = math.floor((now - last) / plan.every)
        return math.floor(last) + periods * plan.every if periods >= 1 else None
    start = datetime.fromtimestamp(math.floor(now) + 1, zone(tz))
    # croniter's get_prev can be off near a daylight-saving change: walk forward from before it
    tick = next_tick(
        schedule, tz, max(last, croniter(plan.cron, start).get_prev(float) - DST_SHIFT)
    )
    found = None
    while tick <= now:
        found, tick = tick, next_tick(schedule, tz, tick)
    return found


def rfc3339(tick: int) -> str:
    return datetime.fromtimestamp(tick, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Cron:
    """Puts an event per tick of `schedule`; acking a tick records it as done."""

    type: ClassVar[str] = "cron"
    durable: ClassVar[bool] = True

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        only(config, ("schedule", "timezone", "catchup", "data"))
        schedule = config.get("schedule")
        if not isinstance(schedule, str) or not schedule.strip():
            raise TriggerError(
                "schedule", f"is required: a cron expression, a macro or @every; {FORMS}"
            )
        timezone = config.get("timezone", "UTC")
        if not isinstance(timezone, str):
            raise TriggerError("timezone", f"must be an IANA time zone name, not {timezone!r}")
        catchup = config.get("catchup", False)
        if not isinstance(catchup, bool):
            raise TriggerError("catchup", f"must be true or false, not {catchup!r}")
        zone(timezone)
        data = config.get("data", "")
        _body(data)
        schedule = " ".join(schedule.split())
        next_tick(schedule, timezone, time.time())  # a date that never comes (Feb 30) fails here
        return {"schedule": schedule, "timezone": timezone, "catchup": catchup, "data": data}

    def __init__(self, config: dict[str, Any], events: Events) -> None:
        self.schedule: str = config["schedule"]
        self.timezone: str = config.get("timezone", "UTC")
        self.catchup: bool = config.get("catchup", False)
        self.data, self.content_type = _body(config.get("data", ""))
        self.events = events
        self.clock: Callable[[], float] = time.time  # tests replace clock and sleep
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.retry_after = 5.0
        self.waiting_for: int | None = None  # the tick the source waits for, when it waits
        self._saved: int | None = None
        self._saving = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._retry: asyncio.Task[None] | None = None
        self._retrying = 0

    async def check(self) -> None:
        """Nothing to reach."""

    async def start(self) -> None:
        self._task = asyncio.create_task(keep_connected(self.events, self._session))

    async def stop(self) -> None:
        tasks = [task for task in (self._task, self._retry) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = self._retry = None
        self.waiting_for = None

    async def ack(self, message: Message) -> None:
        await self._save(cast(int, message.token))

    async def nack(self, message: Message) -> None:
        tick = cast(int, message.token)
        if self._task is None:
            return  # stopped: on the next start, catchup decides
        if (self._saved is not None and tick <= self._saved) or tick < self._retrying:
            return  # a later tick was acked or failed too: only the latest is retried
        if self._retry is not None:
            self._retry.cancel()
        self._retrying = tick
        self._retry = asyncio.create_task(self._again(message))

    async def _again(self, message: Message) -> None:
        await asyncio.sleep(self.retry_after)
        if self._saved is None or cast(int, message.token) > self._saved:
            await self.events.put(Message(message.event, message.token, message.key))

    async def _session(self) -> None:
        last = self._saved = await self._load()
        now = self.clock()
        if last is None:
            last = math.ceil(now)
            await self._save(last)  # ticks count from the trigger's first start
        elif (late := missed(self.schedule, self.timezone, last, now)) is not None:
            if self.catchup:
                await self._put(late)
            last = late
        self.events.connected()
        while True:
            tick = next_tick(self.schedule, self.timezone, last)
            self.waiting_for = tick
            while (delay := tick - self.clock()) > 0:
                await self.sleep(min(delay, WAKE))
            self.waiting_for = None
            latest = missed(self.schedule, self.timezone, tick, self.clock())
            last = tick if latest is None else latest  # more than a period late: the latest only
            await self._put(last)

    async def _save(self, tick: int) -> None:
        async with self._saving:  # acks may come out of order: the saved tick only moves on
            if self._saved is None or tick > self._saved:
                self._saved = tick
                await self.events.save_state(json.dumps({"last": tick}).encode())

    async def _load(self) -> int | None:
        try:
            last = json.loads(await self.events.load_state())["last"]
        except (ValueError, TypeError, KeyError):
            return None  # nothing saved yet (or unreadable): start from now
        return int(last) if isinstance(last, int | float) else None

    async def _put(self, tick: int) -> None:
        await self.events.put(Message(self._event(tick), tick, self.events.id))

    def _event(self, tick: int) -> Event:
        return Event(
            id=f"{self.events.id}-{tick}",
            source=f"ember://cron/{self.events.id}",
            type="io.ember.cron.tick",
            time=rfc3339(tick),
            subject=self.schedule,
            datacontenttype=self.content_type,
            data=self.data,
        )


def _body(data: object) -> tuple[bytes, str]:
    """`data:` as the event's bytes and content type."""
    if isinstance(data, str):
        return data.encode(), "text/plain; charset=utf-8" if data else ""
    if isinstance(data, Mapping):
        try:
            return json.dumps(data).encode(), "application/json"
        except (TypeError, ValueError) as exc:
            raise TriggerError("data", f"cannot be written as JSON: {exc}") from exc
    raise TriggerError("data", f"must be a string or a mapping, not {type(data).__name__}")
