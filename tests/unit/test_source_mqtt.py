"""The MQTT source against a real mosquitto: configuration, attributes, acknowledgement at `ack`
(what is not acked comes again, also after a nack), back-pressure through Receive Maximum, and
reconnection after the broker is killed."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ember.triggers.base import Message, TriggerError
from ember.triggers.sources.mqtt import Mqtt
from tests.brokers.mosquitto import Mosquitto
from tests.brokers.sink import Sink

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
VERSIONS = ["5", "3.1.1"]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as server:
        yield server


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 10.0, why: object = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in time {why}"
        await asyncio.sleep(0.01)


async def publish(
    server: Mosquitto, topic: str, *payloads: bytes, properties: Properties | None = None
) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", server.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1, properties=properties)


def publish_properties(**values: Any) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


class Running:
    """A started source over a sink; stopped on exit."""

    def __init__(self, server: Mosquitto, sink: Sink, topic: str, **config: Any) -> None:
        self.source = Mqtt(Mqtt.validate({"url": server.url, "topic": topic, **config}), sink)
        self.sink = sink

    async def __aenter__(self) -> Mqtt:
        await self.source.start()
        await until(lambda: "running" in self.sink.states, why=self.sink.errors)
        return self.source

    async def __aexit__(self, *exc: object) -> None:
        await self.source.stop()


async def take(sink: Sink, source: Mqtt, ack: bool = True) -> Message:
    message = await sink.get()
    if ack:
        await source.ack(message)
    await sink.done()
    return message


# --- configuration -------------------------------------------------------------------------


def test_validate_fills_defaults() -> None:
    config = Mqtt.validate({"url": "mqtt://broker:1883", "topic": "sensors/+/temp"})
    assert config == {
        "url": "mqtt://broker:1883",
        "topic": "sensors/+/temp",
        "qos": 1,
        "version": "5",
        "client_id": "",
        "username": None,
        "password": None,
        "shared": None,
    }
    given = {"url": "mqtt://b", "topic": "#", "qos": 0, "version": "3.1.1", "shared": "g"}
    assert Mqtt.validate({**given, "username": "u", "password": "p"})["version"] == "3.1.1"
    assert Mqtt.validate({"url": "mqtt://b", "topic": "a/#", "version": 5})["version"] == "5"


@pytest.mark.parametrize(
    ("config", "field", "words"),
    [
        ({"topic": "a"}, "url", "required"),
        ({"url": "mqtts://b:8883", "topic": "a"}, "url", "mqtt://host:port"),
        ({"url": "mqtt://b:1883/x", "topic": "a"}, "url", "mqtt://host:port"),
        ({"url": "mqtt://b:99999", "topic": "a"}, "url", "port"),
        ({"url": "mqtt://b"}, "topic", "required"),
        ({"url": "mqtt://b", "topic": "a/#/b"}, "topic", "'#'"),
        ({"url": "mqtt://b", "topic": "a/b#"}, "topic", "'#'"),
        ({"url": "mqtt://b", "topic": "a+/b"}, "topic", "'+'"),
        ({"url": "mqtt://b", "topic": "$share/g/a"}, "topic", "shared:"),
        ({"url": "mqtt://b", "topic": "a", "qos": 2}, "qos", "QoS 2 is not supported"),
        ({"url": "mqtt://b", "topic": "a", "qos": "1"}, "qos", "0 or 1"),
        ({"url": "mqtt://b", "topic": "a", "version": "4"}, "version", '"3.1.1"'),
        ({"url": "mqtt://b", "topic": "a", "password": "p"}, "password", "username"),
        ({"url": "mqtt://b", "topic": "a", "shared": "a/b"}, "shared", "cannot contain"),
        ({"url": "mqtt://b", "topic": "a", "client_id": 7}, "client_id", "string"),
        ({"url": "mqtt://b", "topic": "a", "topics": "b"}, "topics", "not a setting"),
    ],
)
def test_validate_names_the_key_at_fault(config: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(TriggerError) as caught:
        Mqtt.validate(config)
    assert caught.value.field == field
    assert words in caught.value.problem


def test_check_gives_up_in_about_3_s_when_nothing_answers() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # connections are accepted, never answered
        port = sock.getsockname()[1]
        config = Mqtt.validate({"url": f"mqtt://127.0.0.1:{port}", "topic": "a"})

        async def main() -> None:
            began = time.monotonic()
            with pytest.raises(TriggerError) as caught:
                await Mqtt(config, Sink()).check()
            assert (caught.value.field, "is the broker running?" in caught.value.problem) == (
                "url",
                True,
            )
            assert time.monotonic() - began < 4

        run(main)


def test_check_names_the_url_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        config = Mqtt.validate({"url": f"mqtt://127.0.0.1:{port}", "topic": "a"})

        async def main() -> None:
            began = time.monotonic()
            with pytest.raises(TriggerError) as caught:
                await Mqtt(config, Sink()).check()
            assert caught.value.field == "url"
            assert "is the broker running?" in caught.value.problem
            assert time.monotonic() - began < 4

        run(main)


def test_check_passes_with_a_broker(broker: Mosquitto) -> None:
    config = Mqtt.validate({"url": broker.url, "topic": "a"})
    run(lambda: Mqtt(config, Sink()).check())


# --- messages ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_messages_arrive_with_their_attributes(broker: Mosquitto, version: str) -> None:
    async def main() -> None:
        sink = Sink(id=f"attributes-{version}")
        async with Running(broker, sink, "attrs/+/temp", version=version) as source:
            props = publish_properties(ContentType="application/json", UserProperty=[("room", "k")])
            await publish(broker, f"attrs/{version}/temp", b'{"c": 21}', properties=props)
            message = await take(sink, source)
        event = message.event
        assert event.source == f"mqtt://127.0.0.1:{broker.port}/attrs/+/temp"
        assert event.type == "io.ember.mqtt.message"
        assert event.subject == message.key == f"attrs/{version}/temp"
        assert event.data == b'{"c": 21}'
        assert RFC3339.match(event.time)
        assert re.fullmatch(r"\d+-[0-9a-f]{16}", event.id)
        if version == "5":  # 3.1.1 has no properties: the broker drops them
            assert (event.datacontenttype, event.extensions) == ("application/json", {"room": "k"})
        else:
            assert (event.datacontenttype, event.extensions) == ("", {})

    run(main)


def test_a_cloudevent_keeps_its_attributes(broker: Mosquitto) -> None:
    binary = [("specversion", "1.0"), ("id", "e-1"), ("source", "/shop"), ("type", "t.x")]
    prefixed = [("ce-specversion", "1.0"), ("ce-id", "e-3"), ("ce-source", "/s")]
    structured = (
        b'{"specversion": "1.0", "id": "e-2", "source": "/shop", "type": "t.y",'
        b' "subject": "s", "datacontenttype": "application/json", "data": {"n": 1}}'
    )
    sent: list[tuple[str, bytes, dict[str, Any]]] = [
        (
            "ce/binary",
            b"hello",
            {"ContentType": "text/plain", "UserProperty": [*binary, ("tenant", "a")]},
        ),
        ("ce/structured", structured, {"ContentType": "application/cloudevents+json"}),
        (
            "ce/prefixed",
            b"",
            {"UserProperty": [*prefixed, ("ce-type", "t.z"), ("ce-time", "2024-01-02T03:04:05Z")]},
        ),
        ("ce/malformed", b"x", {"UserProperty": [("specversion", "1.0"), ("id", "e-4")]}),
    ]

    async def main() -> None:
        sink = Sink(id="cloudevents")
        async with Running(broker, sink, "ce/#") as source:
            for topic, payload, properties in sent:
                await publish(broker, topic, payload, properties=publish_properties(**properties))
            got = [await take(sink, source) for _ in sent]
        first, second, third, fourth = (m.event for m in got)
        assert (first.id, first.source, first.type, first.subject) == ("e-1", "/shop", "t.x", "")
        assert (first.datacontenttype, first.data, first.extensions) == (
            "text/plain",
            b"hello",
            {"tenant": "a"},
        )
        assert got[0].key == "ce/binary"  # the ordering key is the topic still
        assert (second.id, second.source, second.type, second.subject) == (
            "e-2",
            "/shop",
            "t.y",
            "s",
        )
        assert (second.datacontenttype, second.data) == ("application/json", b'{"n":1}')
        assert (third.id, third.type, third.time) == ("e-3", "t.z", "2024-01-02T03:04:05Z")
        assert (fourth.type, fourth.subject, fourth.data) == (
            "io.ember.mqtt.message",
            "ce/malformed",
            b"x",
        )

    run(main)


def test_a_shared_subscription_splits_the_messages(broker: Mosquitto) -> None:
    async def main() -> None:
        first, second = Sink(id="member-1"), Sink(id="member-2")
        async with (
            Running(broker, first, "shared/+", shared="workers") as one,
            Running(broker, second, "shared/+", shared="workers") as two,
        ):
            await publish(broker, "shared/a", *(b"%d" % i for i in range(4)))
            await until(lambda: first.messages.qsize() + second.messages.qsize() == 4)
            assert first.messages.qsize() > 0 and second.messages.qsize() > 0
            message = await take(first, one)
            assert message.event.source == f"mqtt://127.0.0.1:{broker.port}/shared/+"
            while not second.messages.empty():
                await take(second, two)

    run(main)


@pytest.mark.parametrize("version", VERSIONS)
def test_what_is_not_acked_comes_again_to_the_next_session(broker: Mosquitto, version: str) -> None:
    topic = f"redeliver/{version}"

    async def main() -> None:
        sink = Sink(id=f"r-{version}")
        async with Running(broker, sink, topic, version=version) as source:
            await publish(broker, topic, b"acked", b"not acked")
            acked = await take(sink, source)
            unacked = await take(sink, source, ack=False)
        assert (acked.event.data, unacked.event.data) == (b"acked", b"not acked")
        sink = Sink(id=f"r-{version}")  # the same trigger: the same client id and session
        async with Running(broker, sink, topic, version=version) as source:
            await publish(broker, topic, b"new")
            again, new = await take(sink, source), await take(sink, source)
        assert (again.event.data, new.event.data) == (b"not acked", b"new")  # "acked" not again
        assert again.event.id == unacked.event.id

    run(main)


def test_a_nack_has_the_broker_send_it_again(broker: Mosquitto) -> None:
    async def main() -> None:
        sink = Sink(id="nack")
        async with Running(broker, sink, "nack/a") as source:
            await publish(broker, "nack/a", b"one", b"two")
            one, two = await sink.get(), await sink.get()
            await source.nack(one)
            await sink.done()
            await asyncio.sleep(0.3)  # a slow function still has "two"
            assert sink.messages.empty() and sink.states == ["running"]  # waits for "two"
            await source.ack(two)
            await sink.done()
            again = await take(sink, source)
            await publish(broker, "nack/a", b"three")
            three = await take(sink, source)  # and not "two" again
        assert [m.event.data for m in (again, three)] == [b"one", b"three"]
        assert sink.states == ["running", "running"]  # reconnected on purpose, never failing
        assert again.event.id == one.event.id
        assert sink.states == ["running", "running"]  # reconnected on purpose, never failing

    run(main)


def test_back_pressure_the_broker_keeps_what_the_trigger_has_no_room_for(
    broker: Mosquitto,
) -> None:
    async def main() -> None:
        sink = Sink(limit=2, id="pressure")
        async with Running(broker, sink, "pressure/a") as source:

            def sent() -> int:  # PUBLISH packets the broker sent this client, from its log
                log = (broker.directory / "mosquitto.log").read_text()
                return log.count(f"Sending PUBLISH to {source._client_id} ")

            await publish(broker, "pressure/a", *(b"%d" % i for i in range(5)))
            await until(lambda: sink.held == 2 and sent() == 2)
            await asyncio.sleep(0.3)  # an absence: give a wrong third PUBLISH time to show
            assert (sink.held, sent(), sink.messages.qsize()) == (2, 2, 2)
            # Acks let the rest come. (mosquitto 2.0.11 refills two places of the window per
            # PUBACK, so how many come per ack is the broker's business, not checked here.)
            taken = [await take(sink, source) for _ in range(5)]
            assert sent() == 5  # each once
        assert [m.event.data for m in taken] == [b"0", b"1", b"2", b"3", b"4"]

    run(main)


def test_reconnects_after_the_broker_is_killed(tmp_path: Path) -> None:
    with Mosquitto(tmp_path) as server:

        async def main() -> None:
            sink = Sink(id="reconnect")
            async with Running(server, sink, "re/a") as source:
                await publish(server, "re/a", b"acked", b"pending")
                await take(sink, source)
                pending = await take(sink, source, ack=False)
                # SIGTERM: mosquitto saves its sessions as it exits. (After a SIGKILL it loses
                # what changed since its last save, which may still be under way.)
                server.kill(signal.SIGTERM)
                await until(lambda: "failing" in sink.states)
                server.start()
                await until(lambda: sink.states[-1] == "running")
                await source.ack(pending)  # too late: its connection is gone
                again = await take(sink, source)
                await publish(server, "re/a", b"after")
                after = await take(sink, source)
            assert (again.event.data, after.event.data) == (b"pending", b"after")
            assert sink.states[:2] == ["running", "failing"]

        run(main)
