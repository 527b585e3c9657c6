"""The cron source: its scheduling decisions as tables (pure functions, no sleeping), catch-up,
skipping and retries driven by a fake clock, and two real ticks of `@every 1s`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import pytest

from ember.triggers.base import TriggerError
from ember.triggers.sources.cron import Cron, missed, next_tick
from tests.brokers.sink import Sink


def at(text: str) -> int:
    """A UTC time as unix seconds: at("2024-10-27 01:30")."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 10))


NEXT = [  # name, schedule, time zone, after, the next three ticks (UTC)
    ("quarter hours", "*/15 * * * *", "UTC", "2024-01-01 10:07", ["10:15", "10:30", "10:45"]),
    ("a tick time itself is not next", "0 * * * *", "UTC", "2024-01-01 10:00", ["11:00"]),
    ("@hourly", "@hourly", "UTC", "2024-01-01 10:59:59", ["11:00", "12:00"]),
    ("@daily", "@daily", "UTC", "2024-01-01 10:00", ["01-02 00:00", "01-03 00:00"]),
    ("@weekly is Sunday", "@weekly", "UTC", "2024-01-03 10:00", ["01-07 00:00", "01-14 00:00"]),
    ("@monthly", "@monthly", "UTC", "2024-01-15 10:00", ["02-01 00:00", "03-01 00:00"]),
    ("@yearly", "@yearly", "UTC", "2024-01-15 10:00", ["2025-01-01 00:00"]),
    ("@every 10s", "@every 10s", "UTC", "2024-01-01 10:00", ["10:00:10", "10:00:20"]),
    ("@every 1m30s", "@every 1m30s", "UTC", "2024-01-01 10:00", ["10:01:30", "10:03:00"]),
    ("@every 2h", "@every 2h", "Europe/Berlin", "2024-01-01 10:00", ["12:00", "14:00"]),
    ("weekdays at 9 in New York, across the switch to summer time", "0 9 * * 1-5",
     "America/New_York", "2024-03-08 00:00", ["03-08 14:00", "03-11 13:00", "03-12 13:00"]),
    ("a half-hour offset", "0 0 * * *", "Asia/Kolkata", "2024-01-01 00:00",
     ["01-01 18:30", "01-02 18:30"]),
    ("a time the spring change skips runs once, at the end of the gap", "30 2 * * *",
     "Europe/Berlin", "2024-03-30 12:00", ["03-31 01:00", "04-01 00:30"]),
    ("hourly across the spring change", "0 * * * *", "Europe/Berlin", "2024-03-30 23:30",
     ["03-31 00:00", "03-31 01:00", "03-31 02:00"]),
    ("a time the autumn change repeats runs once", "30 2 * * *", "Europe/Berlin",
     "2024-10-26 12:00", ["10-27 00:30", "10-28 01:30", "10-29 01:30"]),
    ("hourly across the autumn change follows elapsed time", "0 * * * *", "Europe/Berlin",
     "2024-10-26 23:30", ["10-27 00:00", "10-27 01:00", "10-27 02:00"]),
    ("the repeated 1:30 in New York runs once", "30 1 * * *", "America/New_York",
     "2024-11-02 12:00", ["11-03 05:30", "11-04 06:30"]),
]  # fmt: skip


def when(after: str, short: str) -> int:
    """A table's short time ("10:15", "01-02 00:00") completed from `after`'s date."""
    if len(short) <= 8:
        return at(f"{after[:10]} {short}")
    if len(short) == 11:
        return at(f"{after[:4]}-{short}")
    return at(short)


@pytest.mark.parametrize(
    ("name", "schedule", "tz", "after", "ticks"), NEXT, ids=[r[0] for r in NEXT]
)
def test_next_tick(name: str, schedule: str, tz: str, after: str, ticks: list[str]) -> None:
    got, last = [], at(after)
    for _ in ticks:
        last = next_tick(schedule, tz, last)
        got.append(last)
    assert got == [when(after, tick) for tick in ticks]


MISSED = [  # name, schedule, time zone, last tick, now, the latest tick in (last, now] or None
    ("none due yet", "0 9 * * *", "UTC", "2024-01-01 09:00", "2024-01-02 08:59:59", None),
    ("one due at now exactly", "0 9 * * *", "UTC", "2024-01-01 09:00", "2024-01-02 09:00",
     "2024-01-02 09:00"),
    ("four due: only the latest", "0 9 * * *", "UTC", "2024-01-01 09:00", "2024-01-05 12:00",
     "2024-01-05 09:00"),
    ("months down, every minute", "* * * * *", "UTC", "2024-01-01 00:00", "2024-06-01 00:00:30",
     "2024-06-01 00:00"),
    ("@every, none due", "@every 10s", "UTC", "2024-01-01 00:00:00", "2024-01-01 00:00:09",
     None),
    ("@every keeps its phase", "@every 10s", "UTC", "2024-01-01 00:00:00",
     "2024-01-01 00:00:35", "2024-01-01 00:00:30"),
    ("the autumn repeat of 2:30 is no tick", "30 2 * * *", "Europe/Berlin", "2024-10-27 00:30",
     "2024-10-27 01:45", None),
    ("the autumn repeat of an hour is a tick hourly", "0 * * * *", "Europe/Berlin",
     "2024-10-27 00:00", "2024-10-27 01:45", "2024-10-27 01:00"),
    ("the spring gap's 2:30 ran at 3:00", "30 2 * * *", "Europe/Berlin", "2024-03-30 01:30",
     "2024-03-31 01:30", "2024-03-31 01:00"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "schedule", "tz", "last", "now", "latest"), MISSED, ids=[r[0] for r in MISSED]
)
def test_missed(name: str, schedule: str, tz: str, last: str, now: str, latest: str | None) -> None:
    assert missed(schedule, tz, at(last), at(now)) == (None if latest is None else at(latest))


def test_validate_fills_defaults() -> None:
    assert Cron.validate({"schedule": "*/5  *  * * *"}) == {
        "schedule": "*/5 * * * *",
        "timezone": "UTC",
        "catchup": False,
        "data": "",
    }
    got = Cron.validate({"schedule": "@every 1m", "timezone": "Asia/Tokyo", "data": {"a": 1}})
    assert got["timezone"] == "Asia/Tokyo" and got["data"] == {"a": 1}


BAD = [  # config, the field named, a piece of the problem
    ({}, "schedule", "is required"),
    ({"schedule": "0 * * * * *"}, "schedule", "has 6 fields"),
    ({"schedule": "0 0 * * * * 2030"}, "schedule", "has 7 fields"),
    ({"schedule": "* * * *"}, "schedule", "has 4 fields"),
    ({"schedule": "61 * * * *"}, "schedule", "not a valid cron expression"),
    ({"schedule": "0 0 30 2 *"}, "schedule", "not a valid cron expression"),
    ({"schedule": "H * * * *"}, "schedule", "hashed"),
    ({"schedule": "R 0 * * *"}, "schedule", "random"),
    ({"schedule": "@reboot"}, "schedule", "unknown macro"),
    ({"schedule": "@every 500ms"}, "schedule", "duration like 10s"),
    ({"schedule": "@every"}, "schedule", "duration like 10s"),
    ({"schedule": "@every 0s"}, "schedule", "minimum of 1s"),
    ({"schedule": 5}, "schedule", "is required"),
    ({"schedule": "@daily", "timezone": "Mars/Olympus"}, "timezone", "unknown time zone"),
    ({"schedule": "@every 1s", "timezone": "../etc/passwd"}, "timezone", "unknown time zone"),
    ({"schedule": "@daily", "catchup": "yes"}, "catchup", "true or false"),
    ({"schedule": "@daily", "data": [1, 2]}, "data", "string or a mapping"),
    ({"schedule": "@daily", "data": {"when": datetime.now()}}, "data", "as JSON"),
    ({"schedule": "@daily", "every": "1m"}, "every", "not a setting"),
]


@pytest.mark.parametrize(("config", "field", "problem"), BAD)
def test_validate_refuses_naming_the_field(
    config: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(TriggerError) as caught:
        Cron.validate(config)
    assert caught.value.field == field
    assert problem in caught.value.problem


class Clock:
    """A fake time: `sleep` moves it on at once."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def cron(sink: Sink, clock: Clock | None, **config: Any) -> Cron:
    source = Cron(Cron.validate(config), sink)
    if clock is not None:
        source.clock = clock
    return source


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def saved(sink: Sink) -> int:
    return int(json.loads(sink.state)["last"])


def test_first_start_counts_from_now_and_catches_nothing_up() -> None:
    async def main() -> None:
        sink = Sink()
        source = cron(sink, Clock(at("2024-01-01 10:20") + 0.5), schedule="@hourly", catchup=True)
        await source.start()
        await until(lambda: source.waiting_for is not None)
        assert source.waiting_for == at("2024-01-01 11:00")
        assert sink.messages.empty() and sink.states == ["running"]
        assert saved(sink) == at("2024-01-01 10:20") + 1  # the start, in whole seconds
        await source.stop()

    run(main)


def test_catchup_runs_a_missed_tick_once_not_twice() -> None:
    async def main() -> None:
        sink = Sink(id="nightly")
        sink.state = json.dumps({"last": at("2024-01-01 09:00")}).encode()
        config = {"schedule": "0 9 * * *", "catchup": True, "data": {"job": "report"}}
        # Down three days: the ticks of Jan 2, 3 and 4 were missed; only the 4th runs.
        source = cron(sink, Clock(at("2024-01-04 10:00")), **config)
        await source.start()
        message = await sink.get()
        event = message.event
        assert event.id == f"nightly-{at('2024-01-04 09:00')}"
        assert event.time == "2024-01-04T09:00:00Z"
        assert (event.source, event.type) == ("ember://cron/nightly", "io.ember.cron.tick")
        assert event.subject == "0 9 * * *"
        assert (event.data, event.datacontenttype) == (b'{"job": "report"}', "application/json")
        await until(lambda: source.waiting_for == at("2024-01-05 09:00"))
        assert sink.messages.empty()
        await source.ack(message)
        await sink.done()
        await source.stop()
        assert saved(sink) == at("2024-01-04 09:00")

        # Started again before the next tick: the tick is done, it does not run twice.
        again = cron(sink, Clock(at("2024-01-04 10:05")), **config)
        await again.start()
        await until(lambda: again.waiting_for == at("2024-01-05 09:00"))
        assert sink.messages.empty()
        await again.stop()

    run(main)


def test_an_unacked_catchup_tick_is_redelivered_with_the_same_id() -> None:
    async def main() -> None:
        sink = Sink()
        sink.state = json.dumps({"last": at("2024-01-01 09:00")}).encode()
        first = cron(sink, Clock(at("2024-01-02 10:00")), schedule="0 9 * * *", catchup=True)
        await first.start()
        lost = await sink.get()
        await first.stop()  # the server went down while the function ran
        await sink.done()
        second = cron(sink, Clock(at("2024-01-02 10:01")), schedule="0 9 * * *", catchup=True)
        await second.start()
        again = await sink.get()
        assert again.event.id == lost.event.id == f"t1-{at('2024-01-02 09:00')}"
        await second.stop()

    run(main)


def test_without_catchup_missed_ticks_are_skipped() -> None:
    async def main() -> None:
        sink = Sink()
        sink.state = json.dumps({"last": at("2024-01-01 09:00")}).encode()
        source = cron(sink, Clock(at("2024-01-04 10:00")), schedule="0 9 * * *")
        await source.start()
        await until(lambda: source.waiting_for == at("2024-01-05 09:00"))
        assert sink.messages.empty()
        await source.stop()

    run(main)


def test_a_tick_late_by_more_than_a_period_is_replaced_by_the_latest() -> None:
    async def main() -> None:
        sink, clock = Sink(limit=1), Clock(1_000_000.0)
        source = cron(sink, clock, schedule="@every 10s")
        source.sleep = clock.sleep
        await source.start()
        first = await sink.get()
        assert first.token == 1_000_010
        # The next tick is due and waits for room: the function is slow.
        await until(lambda: clock.now == 1_000_020 and source.waiting_for is None)
        clock.now += 35  # ... for 35 s
        await source.ack(first)
        await sink.done()
        second = await sink.get()
        assert second.token == 1_000_020  # decided when due, handed over when there was room
        await source.ack(second)
        await sink.done()
        third = await sink.get()
        assert third.token == 1_000_050  # not 1_000_030 and 1_000_040: only the latest due
        await source.ack(third)
        assert saved(sink) == 1_000_050
        await source.stop()

    run(main)


def test_a_nacked_tick_is_put_again() -> None:
    async def main() -> None:
        sink = Sink()
        sink.state = json.dumps({"last": at("2024-01-01 09:00")}).encode()
        source = cron(sink, Clock(at("2024-01-02 10:00")), schedule="0 9 * * *", catchup=True)
        source.retry_after = 0.01
        await source.start()
        failed = await sink.get()
        await source.nack(failed)
        await sink.done()
        retried = await sink.get()
        assert retried.event.id == failed.event.id
        assert saved(sink) == at("2024-01-01 09:00")  # a nack records nothing
        await source.ack(retried)
        await sink.done()
        assert saved(sink) == at("2024-01-02 09:00")
        await source.stop()

    run(main)


def test_every_second_on_the_real_clock() -> None:
    async def main() -> None:
        sink = Sink()
        source = cron(sink, None, schedule="@every 1s", data="ping")
        await source.start()
        ticks = []
        for _ in range(2):
            message = await sink.get(timeout=5)
            assert message.token <= time.time()  # type: ignore[operator]  # never early
            assert message.event.data == b"ping"
            assert message.event.datacontenttype == "text/plain; charset=utf-8"
            await source.ack(message)
            await sink.done()
            ticks.append(message.token)
        assert ticks[1] == ticks[0] + 1  # type: ignore[operator]
        assert saved(sink) == ticks[1]
        await source.stop()

    run(main)
