"""The NATS trigger sources (`nats`: core subjects; `jetstream`: a durable pull consumer)
against a real nats-server."""

from __future__ import annotations

import asyncio
import base64
import calendar
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from ember.triggers.base import Event, Message, TriggerError
from ember.triggers.sources.jetstream import JetStream
from ember.triggers.sources.nats import PENDING_MSGS, NatsCore, _cloudevent
from tests.brokers.nats import Nats
from tests.brokers.sink import Sink

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
Source = NatsCore | JetStream


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nats]:
    with Nats(tmp_path_factory.mktemp("nats")) as broker:
        yield broker


def run(body: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(body, 30))


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[Client]:
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


@asynccontextmanager
async def started(kind: type[Source], config: dict[str, Any], sink: Sink) -> AsyncIterator[Any]:
    source = kind(kind.validate(config), sink)
    await source.start()
    try:
        await until(lambda: sink.states[-1:] == ["running"], "the source connects")
        yield source
    finally:
        await source.stop()


async def received(sink: Sink, count: int) -> list[Message]:
    return [await sink.get() for _ in range(count)]


async def stream(nc: Client, name: str, *messages: bytes) -> None:
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"{name}.>"])
    for number, data in enumerate(messages):
        await js.publish(f"{name}.m{number}", data)


def unused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"nats://127.0.0.1:{sock.getsockname()[1]}"


# ---- validate ----
def test_validate_fills_defaults() -> None:
    config = {"url": "nats://a:4222, tls://b:4443", "subject": "orders.*.>"}
    assert NatsCore.validate(config) == {
        "url": "nats://a:4222,tls://b:4443",
        "subject": "orders.*.>",
        "queue": "",
    }
    assert JetStream.validate({"url": "nats://a", "stream": "ORDERS"}) == {
        "url": "nats://a",
        "stream": "ORDERS",
        "subject": "",
        "durable": "",
        "deliver": "new",
        "ack_wait": 30,
        "max_deliver": -1,
    }


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"subject": "a"}, "url"),
        ({"url": "http://a:4222", "subject": "a"}, "url"),
        ({"url": "nats://a:4222,", "subject": "a"}, "url"),
        ({"url": "nats://a:99999", "subject": "a"}, "url"),
        ({"url": "nats://a"}, "subject"),
        ({"url": "nats://a", "subject": "a..b"}, "subject"),
        ({"url": "nats://a", "subject": "a.>.b"}, "subject"),
        ({"url": "nats://a", "subject": "a.b*"}, "subject"),
        ({"url": "nats://a", "subject": "a b"}, "subject"),
        ({"url": "nats://a", "subject": "a", "queue": "x y"}, "queue"),
        ({"url": "nats://a", "subject": "a", "topic": "b"}, "topic"),
    ],
)
def test_validate_core_names_the_bad_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(TriggerError) as caught:
        NatsCore.validate(config)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"url": "nats://a"}, "stream"),
        ({"url": "nats://a", "stream": "A.B"}, "stream"),
        ({"url": "nats://a", "stream": "A", "subject": "a.>.b"}, "subject"),
        ({"url": "nats://a", "stream": "A", "durable": "a*"}, "durable"),
        ({"url": "nats://a", "stream": "A", "deliver": "last"}, "deliver"),
        ({"url": "nats://a", "stream": "A", "ack_wait": 0}, "ack_wait"),
        ({"url": "nats://a", "stream": "A", "ack_wait": "30s"}, "ack_wait"),
        ({"url": "nats://a", "stream": "A", "max_deliver": 0}, "max_deliver"),
        ({"url": "nats://a", "stream": "A", "queue": "q"}, "queue"),
    ],
)
def test_validate_jetstream_names_the_bad_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(TriggerError) as caught:
        JetStream.validate(config)
    assert caught.value.field == field


# ---- CloudEvents in messages ----
def test_structured_cloudevent_with_json_data_or_text_and_a_body_that_is_none() -> None:
    def read(body: object, headers: dict[str, str]) -> Event:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return _cloudevent(Event(id="n-1", source="nats://h/s", type="t", data=data), headers)

    structured = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
    event = read({"specversion": "1.0", "id": "x", "data": {"a": [1]}}, structured)
    assert (event.id, event.data, event.datacontenttype) == ("x", b'{"a":[1]}', "application/json")
    event = read({"id": "y", "datacontenttype": "text/plain", "data": "hi"}, structured)
    assert (event.id, event.data, event.datacontenttype) == ("y", b"hi", "text/plain")
    for body in (b"not json", [1, 2], {"id": "z", "data_base64": "%%"}):
        event = read(body, structured)  # not a CloudEvent after all: kept as it came
        assert (event.id, event.type, event.extensions) == ("n-1", "t", {})
    event = read(b"x", {"CE-ID": "k", "ce-Partitionkey": "p", "ce-specversion": "1.0"})
    assert (event.id, event.extensions, event.data) == ("k", {"partitionkey": "p"}, b"x")


# ---- check ----
def test_check_unreachable_names_url() -> None:
    async def body() -> None:
        kinds: list[tuple[type[Source], dict[str, str]]] = [
            (NatsCore, {"subject": "a"}),
            (JetStream, {"stream": "A"}),
        ]
        for kind, config in kinds:
            source = kind(kind.validate({"url": unused_url(), **config}), Sink())
            began = time.monotonic()
            with pytest.raises(TriggerError) as caught:
                await source.check()
            assert caught.value.field == "url"
            assert "cannot reach" in caught.value.problem
            assert "ConnectionRefusedError" in caught.value.problem
            assert time.monotonic() - began < 3

    run(body())


def test_check_missing_stream_names_stream(server: Nats) -> None:
    async def body() -> None:
        async with connected(server.url) as nc:
            await stream(nc, "CHECKED")
        await NatsCore(NatsCore.validate({"url": server.url, "subject": "a"}), Sink()).check()
        await JetStream(
            JetStream.validate({"url": server.url, "stream": "CHECKED"}), Sink()
        ).check()
        missing = JetStream(JetStream.validate({"url": server.url, "stream": "NOPE"}), Sink())
        with pytest.raises(TriggerError) as caught:
            await missing.check()
        assert caught.value.field == "stream"
        assert "no stream named 'NOPE'" in caught.value.problem

    run(body())


# ---- core NATS ----
def test_core_queue_group_shares_and_plain_subscriber_gets_all(server: Nats) -> None:
    async def body() -> None:
        config = {"url": server.url, "subject": "core.q"}
        grouped = {**config, "queue": "workers"}
        one, two, every = (Sink(limit=100, id=name) for name in ("q1", "q2", "q3"))
        async with (
            started(NatsCore, grouped, one),
            started(NatsCore, grouped, two),
            started(NatsCore, config, every),
            connected(server.url) as nc,
        ):
            for number in range(40):
                await nc.publish("core.q", str(number).encode())
            await nc.flush()
            all_of = await received(every, 40)
            await until(lambda: one.messages.qsize() + two.messages.qsize() >= 40, "40 shared")
            firsts = await received(one, one.messages.qsize())
            seconds = await received(two, two.messages.qsize())
        assert sorted(m.event.data for m in firsts + seconds) == sorted(
            m.event.data for m in all_of
        )
        assert len(firsts + seconds) == 40 and firsts and seconds
        event = all_of[0].event
        assert (event.source, event.type, event.subject) == (
            f"{server.url}/core.q",
            "io.ember.nats.message",
            "core.q",
        )
        assert all_of[0].key == "core.q" and RFC3339.fullmatch(event.time)
        assert len({m.event.id for m in all_of + firsts + seconds}) == 80

    run(body())


def test_core_wildcards_and_cloudevents(server: Nats) -> None:
    async def body() -> None:
        star, rest = Sink(id="w1"), Sink(id="w2")
        async with (
            started(NatsCore, {"url": server.url, "subject": "wild.*.x"}, star),
            started(NatsCore, {"url": server.url, "subject": "wild.>"}, rest),
            connected(server.url) as nc,
        ):
            for subject in ("wild.a.x", "wild.b.y", "wild.a.x.z"):
                await nc.publish(subject, b"{}", headers={"Content-Type": "application/json"})
            binary = {"ce-id": "e1", "ce-source": "/shop", "ce-type": "com.shop.order"}
            binary |= {"ce-specversion": "1.0", "ce-time": "2024-05-01T10:00:00Z"}
            binary |= {"ce-subject": "order-7", "ce-traceparent": "00-ab", "Content-Type": "text/x"}
            await nc.publish("wild.ce.x", b"order", headers=binary)
            structured = {"specversion": "1.0", "id": "e2", "source": "/s", "type": "com.t"}
            structured |= {"data_base64": base64.b64encode(b"\x00raw").decode(), "tenant": "acme"}
            await nc.publish(
                "wild.ce.x",
                json.dumps(structured).encode(),
                headers={"Content-Type": "application/cloudevents+json"},
            )
            starred = await received(star, 3)
            everything = await received(rest, 5)
        assert [m.event.subject for m in starred[:1] + everything[:3]] == [
            "wild.a.x",
            "wild.a.x",
            "wild.b.y",
            "wild.a.x.z",
        ]
        assert starred[0].event.datacontenttype == "application/json"
        event = starred[1].event
        assert (event.id, event.source, event.type, event.subject, event.time) == (
            "e1",
            "/shop",
            "com.shop.order",
            "order-7",
            "2024-05-01T10:00:00Z",
        )
        assert event.extensions == {"traceparent": "00-ab"} and event.data == b"order"
        assert (event.datacontenttype, starred[1].key) == ("text/x", "wild.ce.x")
        event = starred[2].event
        assert (event.id, event.source, event.type, event.data) == ("e2", "/s", "com.t", b"\x00raw")
        assert event.extensions == {"tenant": "acme"}
        assert star.messages.empty()

    run(body())


def test_core_slow_consumer_drops_are_counted(server: Nats) -> None:
    async def body() -> None:
        sink, sent = Sink(limit=1, id="slow"), PENDING_MSGS + 500
        async with (
            started(NatsCore, {"url": server.url, "subject": "slow"}, sink) as source,
            connected(server.url) as nc,
        ):
            for number in range(sent):
                await nc.publish("slow", str(number).encode())
            await nc.flush()
            await until(lambda: source.dropped > 0, "a drop is counted")
            got = 0
            while got + source.dropped < sent:
                await sink.get()
                await sink.done()
                got += 1
        assert source.dropped >= sent - PENDING_MSGS - 2  # the sink holds 1, the source 1

    run(body())


# ---- JetStream ----
def test_jetstream_attributes_and_nak(server: Nats) -> None:
    async def body() -> None:
        sink = Sink(id="attrs")
        async with connected(server.url) as nc:
            before = time.time()
            await stream(nc, "ATTRS", b"zero", b"one", b"two")
            config = {"url": server.url, "stream": "ATTRS", "deliver": "all"}
            async with started(JetStream, config, sink) as source:
                messages = await received(sink, 3)
                assert [m.event.id for m in messages] == ["ATTRS-1", "ATTRS-2", "ATTRS-3"]
                event = messages[1].event
                assert (event.source, event.type, event.subject, event.data) == (
                    f"{server.url}/ATTRS",
                    "io.ember.jetstream.message",
                    "ATTRS.m1",
                    b"one",
                )
                assert event.extensions == {"deliverycount": "1"}
                assert messages[1].key == "ATTRS.m1" and RFC3339.fullmatch(event.time)
                stamp = calendar.timegm(time.strptime(event.time[:19], "%Y-%m-%dT%H:%M:%S"))
                assert before - 1 < stamp < time.time() + 1  # the broker's time of writing
                await source.nack(messages[1])
                await sink.done()
                again = await sink.get()
                assert again.event.id == "ATTRS-2"
                assert again.event.extensions == {"deliverycount": "2"}
                assert sink.pending == 0
                info = await nc.jetstream().consumer_info("ATTRS", "ember-attrs")
                assert info.config.ack_wait == 30 and info.config.max_ack_pending == 10_000

    run(body())


def test_jetstream_acked_stay_acked_unacked_come_back(server: Nats) -> None:
    async def body() -> None:
        config = {"url": server.url, "stream": "REDO", "deliver": "all", "ack_wait": 1}
        async with connected(server.url) as nc:
            await stream(nc, "REDO", b"acked", b"left")
            sink = Sink(id="redo")
            async with started(JetStream, config, sink) as source:
                acked, _ = await received(sink, 2)
                await source.ack(acked)
            sink = Sink(id="redo")  # the same trigger, a new session
            async with started(JetStream, config, sink):
                again = await sink.get()
                assert (again.event.id, again.event.data) == ("REDO-2", b"left")
                assert again.event.extensions == {"deliverycount": "2"}
                await nc.jetstream().publish("REDO.later", b"later")
                assert (await sink.get()).event.id == "REDO-3"
                assert sink.messages.empty()  # REDO-1 was not sent again

    run(body())


def test_jetstream_back_pressure(server: Nats) -> None:
    async def body() -> None:
        sink = Sink(limit=2, id="bp")
        async with connected(server.url) as nc:
            await stream(nc, "BP", *(b"%d" % n for n in range(50)))
            js = nc.jetstream()
            config = {"url": server.url, "stream": "BP", "deliver": "all"}
            async with started(JetStream, config, sink) as source:
                ids: list[str] = []
                backlogs: set[int] = set()
                for _ in range(50):
                    message = await sink.get()
                    info = await js.consumer_info("BP", "ember-bp")
                    taken = len(ids) + 1 + sink.messages.qsize()  # what the sink was handed
                    # the source reads at most one message past what the sink takes (it waits
                    # in `put` with it); the broker keeps the rest
                    assert sink.held <= 2
                    assert info.delivered.stream_seq <= taken + 1
                    assert info.num_pending >= 50 - taken - 1
                    backlogs.add(sink.pending)
                    ids.append(message.event.id)
                    await source.ack(message)
                    await sink.done()
        assert ids == [f"BP-{n}" for n in range(1, 51)]
        assert max(backlogs) >= 45 and sink.pending == 0

    run(body())


def test_reconnects_after_the_server_is_killed(tmp_path: Path) -> None:
    with Nats(tmp_path) as server:

        async def body() -> None:
            sink, core = Sink(id="kill"), Sink(id="killcore")
            config = {"url": server.url, "stream": "KILL", "deliver": "all", "ack_wait": 1}
            async with connected(server.url) as nc:
                await stream(nc, "KILL", b"a", b"b", b"c")
            async with (
                started(JetStream, config, sink) as source,
                started(NatsCore, {"url": server.url, "subject": "kc"}, core),
            ):
                for message in await received(sink, 3):
                    await source.ack(message)
                await until(
                    lambda: server.stored_ack_floor("KILL", "ember-kill") == 3,
                    "the server has written the acks to disk",
                )
                server.kill()
                await until(lambda: "failing" in sink.states, "the source sees the loss")
                await until(lambda: "failing" in core.states, "the core source too")
                server.start()
                await until(lambda: sink.states[-1] == "running", "JetStream reconnects")
                await until(lambda: core.states[-1] == "running", "core reconnects")
                async with connected(server.url) as after:
                    info = await after.jetstream().consumer_info("KILL", "ember-kill")
                    assert info.ack_floor.stream_seq == 3 and info.num_ack_pending == 0
                    await after.jetstream().publish("KILL.d", b"d")
                    await after.publish("kc", b"core")
                    later = await sink.get()
                    assert (later.event.id, later.event.data) == ("KILL-4", b"d")
                    assert (await core.get()).event.data == b"core"
                    # not acked: sent again after ack_wait, and nothing before it was
                    assert (await sink.get()).event.id == "KILL-4"
            assert sink.states[0] == "running" and sink.states[1] == "failing"
            assert sink.errors[0].startswith("ConnectionError: lost nats://127.0.0.1")

        run(body())
