"""A running trigger's rules, one at a time, with a `Host` that answers as the test says (the
gateway and the queue are exercised for real in tests/integration/test_triggers.py): checks of
declared triggers, filters, back-pressure, order per key, batches, and what is acked when."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec
import pytest

from ember.gateway.app import Response
from ember.queue.base import Invocation
from ember.spec import TriggerSpec
from ember.triggers import plan as plans
from ember.triggers.base import Event, Message, TriggerError
from ember.triggers.runner import Trigger

Done = Callable[[Any, Response], None]


class Exchange:
    error, rid, started, t0 = "", "r", 0.0, 0.0


class Host:
    """Holds each run until the test answers it; records what was queued."""

    def __init__(self) -> None:
        self.runs: list[tuple[list[tuple[bytes, bytes]], bytes, Done]] = []
        self.queued: list[tuple[Invocation, bool]] = []
        self.queue_fails = False

    def run(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes, done: Done) -> None:
        self.runs.append((headers, body, done))

    def answer(self, index: int, status: int, body: bytes = b"") -> None:
        self.runs[index][2](Exchange(), Response(status, [], body))

    def invocation(
        self, function: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Invocation:
        return Invocation(
            id="i",
            function=function,
            method="POST",
            path=path,
            raw_path=path,
            query=b"",
            headers=headers,
            body=body,
            accepted=0.0,
        )

    async def queue(self, inv: Invocation, failed: object) -> Invocation:
        if self.queue_fails:
            raise OSError("queue down")
        self.queued.append((inv, failed is not None))
        return inv

    async def load_state(self, trigger_id: str) -> bytes:
        return b""

    async def save_state(self, trigger_id: str, state: bytes) -> None: ...


class Recorded:
    """A source that records acks and nacks (the broker's side)."""

    type: ClassVar[str] = "recorded"
    durable: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any], events: Any) -> None:
        self.acked: list[str] = []
        self.nacked: list[str] = []

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ack(self, message: Message) -> None:
        self.acked.append(message.event.id)

    async def nack(self, message: Message) -> None:
        self.nacked.append(message.event.id)


def trigger(host: Host, delivery: dict[str, Any] | None = None, filters: Any = ()) -> Trigger:
    spec = TriggerSpec(name="t", type="recorded")
    planned = plans.Plan(
        spec,
        Recorded,  # type: ignore[arg-type]
        {},
        tuple(filters),
        plans._delivery(delivery or {}),
    )
    return Trigger("tr1", "default/fn", "t", planned, host)  # type: ignore[arg-type]


def message(n: int, subject: str = "s", data: bytes = b"x") -> Message:
    return Message(Event(id=f"e{n}", source="src", type="t", subject=subject, data=data))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def source(t: Trigger) -> Recorded:
    assert isinstance(t.source, Recorded)
    return t.source


def test_declared_triggers_are_checked_and_name_the_key() -> None:
    def problem(**fields: Any) -> str:
        spec = msgspec.convert({"name": "t", "type": "cron", **fields}, TriggerSpec)
        with pytest.raises(TriggerError) as caught:
            plans.plan(spec)
        return str(caught.value)

    assert problem(type="pigeon").startswith("type: unknown trigger type 'pigeon'")
    assert problem(config={"schedule": "* * *"}).startswith("schedule:")
    base = {"config": {"schedule": "@every 1s"}}
    assert problem(**base, filter=[{"attribute": "Bad!", "exact": "x"}]).startswith(
        "filter[0].attribute:"
    )
    assert problem(**base, filter=[{"attribute": "type"}]).startswith("filter[0]:")
    assert problem(**base, filter=[{"attribute": "type", "prefix": ""}]).startswith(
        "filter[0].prefix:"
    )
    assert problem(**base, delivery={"mode": "later"}).startswith("delivery.mode:")
    assert problem(**base, delivery={"concurrency": 0}).startswith("delivery.concurrency:")
    assert problem(**base, delivery={"batch": {"size": 2, "max_wait": "2h"}}).startswith(
        "delivery.batch.max_wait:"
    )
    assert problem(**base, delivery={"order_by": "key", "batch": {"size": 2}}).startswith(
        "delivery.order_by:"
    )
    assert problem(**base, delivery={"speed": 1}).startswith("delivery.speed:")
    good = plans.plan(
        msgspec.convert(
            {
                **base,
                "name": "t",
                "type": "cron",
                "filter": [{"attribute": "subject", "suffix": ".eu"}],
                "delivery": {"batch": {"size": 5, "max_wait": "200ms"}, "concurrency": 2},
            },
            TriggerSpec,
        )
    )
    assert (good.delivery.batch_size, good.delivery.batch_wait, good.delivery.capacity) == (
        5,
        0.2,
        10,
    )
    assert good.wanted(Event(id="1", source="s", type="t", subject="a.eu"))
    assert not good.wanted(Event(id="1", source="s", type="t", subject="a.us"))


def test_an_event_is_acked_only_after_the_function_answered() -> None:
    async def body() -> None:
        host = Host()
        t = trigger(host)
        await t.start()
        await t.put(message(1))
        headers, data = dict(host.runs[0][0]), host.runs[0][1]
        assert headers[b"ce-id"] == b"e1" and headers[b"ce-specversion"] == b"1.0"
        assert data == b"x"
        await settle()
        assert source(t).acked == []  # still running
        host.answer(0, 200)
        await settle()
        assert source(t).acked == ["e1"] and t.delivered == 1

    asyncio.run(body())


def test_a_failure_is_queued_with_its_attempt_and_then_acked_or_nacked_if_not_stored() -> None:
    async def body() -> None:
        host = Host()
        t = trigger(host)
        await t.start()
        await t.put(message(1))
        host.answer(0, 500)
        await settle()
        ((inv, with_attempt),) = host.queued
        assert with_attempt and dict(inv.headers)[b"ce-id"] == b"e1"
        assert source(t).acked == ["e1"] and t.queued == 1
        host.queue_fails = True
        await t.put(message(2))
        host.answer(1, 503)
        await settle()
        assert source(t).nacked == ["e2"] and t.failed == 1

    asyncio.run(body())


def test_filtered_events_are_acked_and_counted_not_delivered() -> None:
    async def body() -> None:
        host = Host()
        t = trigger(host, filters=[plans.Filter("subject", prefix="keep.")])
        await t.start()
        await t.put(message(1, subject="drop.me"))
        await t.put(message(2, subject="keep.me"))
        await settle()
        assert len(host.runs) == 1 and dict(host.runs[0][0])[b"ce-id"] == b"e2"
        assert source(t).acked == ["e1"] and t.filtered == 1

    asyncio.run(body())


def test_put_waits_while_the_trigger_holds_its_concurrency() -> None:
    async def body() -> None:
        host = Host()
        t = trigger(host, {"concurrency": 2})
        await t.start()
        await t.put(message(1))
        await t.put(message(2))
        assert t.room == 0
        third = asyncio.ensure_future(t.put(message(3)))
        await settle()
        assert not third.done() and len(host.runs) == 2
        host.answer(0, 200)
        await settle()
        assert third.done() and len(host.runs) == 3
        assert t.statistics().lag == 2

    asyncio.run(body())


def test_order_by_delivers_one_per_key_in_order() -> None:
    async def body() -> None:
        host = Host()
        t = trigger(host, {"order_by": "subject"})
        await t.start()
        for n, subject in enumerate(["a", "b", "a", "a"]):
            await t.put(message(n, subject=subject))
        ids = lambda: [dict(h)[b"ce-id"] for h, _, _ in host.runs]  # noqa: E731
        assert ids() == [b"e0", b"e1"]  # the second and third "a" wait
        host.answer(1, 200)  # "b" done: nothing of "a" may start
        await settle()
        assert ids() == [b"e0", b"e1"]
        host.answer(0, 500)  # the first "a" failed (queued): the next "a" goes
        await settle()
        assert ids() == [b"e0", b"e1", b"e2"]
        host.answer(2, 200)
        await settle()
        assert ids() == [b"e0", b"e1", b"e2", b"e3"]

    asyncio.run(body())


def test_a_batch_acks_what_succeeded_and_queues_only_the_failed_ids() -> None:
    async def body() -> None:
        host = Host()
        t = trigger(host, {"batch": {"size": 3, "max_wait": "5s"}})
        await t.start()
        for n in range(3):
            await t.put(message(n))
        ((headers, data, _),) = host.runs
        assert dict(headers)[b"content-type"] == b"application/cloudevents-batch+json"
        assert [e["id"] for e in json.loads(data)] == ["e0", "e1", "e2"]
        host.answer(0, 200, b'{"failed": ["e1"]}')
        await settle()
        assert [dict(inv.headers)[b"ce-id"] for inv, _ in host.queued] == [b"e1"]
        assert sorted(source(t).acked) == ["e0", "e1", "e2"]
        assert (t.delivered, t.queued) == (2, 1)

    asyncio.run(body())


def test_a_partial_batch_goes_after_max_wait() -> None:
    async def body() -> None:
        host = Host()
        t = trigger(host, {"batch": {"size": 10, "max_wait": "20ms"}})
        await t.start()
        await t.put(message(1))
        assert host.runs == []
        for _ in range(100):
            if host.runs:
                break
            await asyncio.sleep(0.01)
        assert len(json.loads(host.runs[0][1])) == 1

    asyncio.run(body())


def test_structured_delivery_sends_one_cloudevents_json_document() -> None:
    async def body() -> None:
        host = Host()
        t = trigger(host, {"structured": True, "path": "/events"})
        await t.start()
        await t.put(message(1, data=b'{"a": 1}'))
        headers, data, _ = host.runs[0]
        assert dict(headers)[b"content-type"].startswith(b"application/cloudevents+json")
        document = json.loads(data)
        assert (document["id"], document["subject"], document["specversion"]) == ("e1", "s", "1.0")
        assert t.path == "/fn/default/fn/events"

    asyncio.run(body())
