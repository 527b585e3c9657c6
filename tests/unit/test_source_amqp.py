"""The AMQP source against a real RabbitMQ node (tests/brokers/rabbitmq.py, started once for
the session): validation, check, attributes, acks and requeues, back-pressure, reconnects."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest

from ember.triggers.base import Message, TriggerError
from ember.triggers.sources.amqp import Amqp
from tests.brokers.rabbitmq import RabbitMQ
from tests.brokers.sink import Sink


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    with RabbitMQ(tmp_path_factory.mktemp("rabbitmq")) as broker:
        yield broker


@pytest.fixture
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


def config(broker: RabbitMQ, queue: str, **more: Any) -> dict[str, Any]:
    return Amqp.validate({"url": broker.url, "queue": queue, **more})


async def publish(
    url: str, key: str, *bodies: bytes, exchange: str = "", transient: bool = False, **props: Any
) -> None:
    """Publish with confirms: persistent messages unless `transient`."""
    mode = aio_pika.DeliveryMode.NOT_PERSISTENT if transient else aio_pika.DeliveryMode.PERSISTENT
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
        for body in bodies:
            await target.publish(aio_pika.Message(body, delivery_mode=mode, **props), key)


async def ready(url: str, queue: str) -> int:
    """The queue's messages not sent to a consumer."""
    connection = await aio_pika.connect(url)
    async with connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        assert declared.declaration_result is not None
        return declared.declaration_result.message_count or 0


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def settle(source: Amqp, sink: Sink, message: Message, ok: bool = True) -> None:
    await (source.ack(message) if ok else source.nack(message))
    await sink.done()


# Configuration --------------------------------------------------------------------------------


def test_validate_fills_defaults() -> None:
    assert Amqp.validate({"url": "amqp://u:p@h/v", "queue": "orders"}) == {
        "url": "amqp://u:p@h/v",
        "queue": "orders",
        "declare": True,
        "exchange": "",
        "routing_key": "",
    }


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"queue": "q"}, "url"),
        ({"url": "http://h:5672/", "queue": "q"}, "url"),
        ({"url": "amqp://h:99999/", "queue": "q"}, "url"),
        ({"url": "amqp://h/"}, "queue"),
        ({"url": "amqp://h/", "queue": ""}, "queue"),
        ({"url": "amqp://h/", "queue": "q" * 256}, "queue"),
        ({"url": "amqp://h/", "queue": "amq.gen"}, "queue"),
        ({"url": "amqp://h/", "queue": "q", "declare": "yes"}, "declare"),
        ({"url": "amqp://h/", "queue": "q", "prefetch": 10}, "prefetch"),
        ({"url": "amqp://h/", "queue": "q", "declare": False, "exchange": "x"}, "exchange"),
        ({"url": "amqp://h/", "queue": "q", "routing_key": "k"}, "routing_key"),
        ({"url": "amqp://h/", "queue": "q", "exchange": 3}, "exchange"),
    ],
)
def test_validate_names_the_wrong_key(entry: dict[str, Any], field: str) -> None:
    with pytest.raises(TriggerError) as caught:
        Amqp.validate(entry)
    assert caught.value.field == field


def test_a_bad_url_is_shown_without_its_password() -> None:
    with pytest.raises(TriggerError) as caught:
        Amqp.validate({"url": "http://user:s3cret@h/", "queue": "q"})
    assert "s3cret" not in str(caught.value)


def test_check_fails_on_an_unreachable_broker() -> None:
    source = Amqp(Amqp.validate({"url": "amqp://u:s3cret@127.0.0.1:1/", "queue": "q"}), Sink())
    with pytest.raises(TriggerError) as caught:
        asyncio.run(source.check())
    assert caught.value.field == "url"
    assert "amqp://127.0.0.1:1" in caught.value.problem and "s3cret" not in caught.value.problem


def test_check_names_a_missing_queue_or_exchange(rabbitmq: RabbitMQ, queue: str) -> None:
    async def main() -> None:
        missing = Amqp(config(rabbitmq, queue, declare=False), Sink())
        with pytest.raises(TriggerError) as caught:
            await missing.check()
        assert caught.value.field == "queue"
        unbound = Amqp(config(rabbitmq, queue, exchange="nowhere", routing_key="k"), Sink())
        with pytest.raises(TriggerError) as caught:
            await unbound.check()
        assert caught.value.field == "exchange"
        await Amqp(config(rabbitmq, queue), Sink()).check()  # declares it
        await Amqp(config(rabbitmq, queue, declare=False), Sink()).check()
        connection = await aio_pika.connect(rabbitmq.url)
        async with connection:
            await (await connection.channel()).declare_queue(f"{queue}-t", durable=False)
        transient = Amqp(config(rabbitmq, f"{queue}-t"), Sink())
        with pytest.raises(TriggerError) as caught:
            await transient.check()  # declare: true asks for a durable queue
        assert caught.value.field == "queue" and "declare: false" in caught.value.problem
        await Amqp(config(rabbitmq, f"{queue}-t", declare=False), Sink()).check()

    asyncio.run(main())


# Delivery -------------------------------------------------------------------------------------


def test_messages_arrive_in_order_with_their_attributes(rabbitmq: RabbitMQ, queue: str) -> None:
    url = rabbitmq.url
    sent = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)

    async def main() -> None:
        sink = Sink()
        source = Amqp(config(rabbitmq, queue, exchange="amq.topic", routing_key="orders.*"), sink)
        await source.check()
        await publish(url, "orders.new", b"plain", exchange="amq.topic")
        await publish(
            url,
            "orders.paid",
            b'{"n": 1}',
            exchange="amq.topic",
            message_id="m-1",
            timestamp=sent,
            content_type="application/json",
        )
        binary = {"cloudEvents_specversion": "1.0", "cloudEvents_id": "ce-7"}
        binary |= {"cloudEvents_source": "/shop", "cloudEvents_type": "com.shop.paid"}
        binary |= {"cloudEvents_subject": "100% paid", "cloudEvents_region": "eu"}
        await publish(
            url, "orders.x", b"<b/>", exchange="amq.topic", headers=binary, content_type="text/xml"
        )
        envelope = b'{"specversion": "1.0", "id": "s-1", "source": "/s", "type": "t.s", '
        envelope += b'"data": {"a": 1}, "tenant": "acme"}'
        await publish(
            url,
            "orders.y",
            envelope,
            exchange="amq.topic",
            content_type="application/cloudevents+json",
        )
        await source.start()
        try:
            first, second, third, fourth = [await sink.get() for _ in range(4)]
        finally:
            await source.stop()
        assert sink.states == ["running"] and sink.pending == 4

        plain = first.event
        assert uuid.UUID(plain.id) and plain.data == b"plain" and plain.datacontenttype == ""
        assert plain.source == f"amqp://127.0.0.1:{rabbitmq.port}/{queue}"
        assert plain.type == "io.ember.amqp.message" and plain.subject == "orders.new"
        age = datetime.now(UTC) - datetime.fromisoformat(plain.time)
        assert abs(age.total_seconds()) < 60 and plain.time.endswith("Z")
        assert first.key == "orders.new"

        assert second.event.id == "m-1" and second.event.time == "2024-05-06T07:08:09Z"
        assert second.event.datacontenttype == "application/json"
        assert second.event.data == b'{"n": 1}' and second.event.subject == "orders.paid"

        ce = third.event
        assert (ce.id, ce.source, ce.type, ce.subject) == (
            "ce-7",
            "/shop",
            "com.shop.paid",
            "100% paid",
        )
        assert ce.extensions == {"region": "eu"} and ce.datacontenttype == "text/xml"
        assert ce.data == b"<b/>" and third.key == "orders.x"

        structured = fourth.event
        assert (structured.id, structured.source, structured.type) == ("s-1", "/s", "t.s")
        assert structured.data == b'{"a":1}' and structured.extensions == {"tenant": "acme"}

    asyncio.run(main())


def test_acked_messages_stay_gone_and_the_rest_come_again(rabbitmq: RabbitMQ, queue: str) -> None:
    async def main() -> None:
        sink = Sink()
        source = Amqp(config(rabbitmq, queue), sink)
        await source.check()
        for n in (1, 2, 3):
            await publish(rabbitmq.url, queue, str(n).encode(), message_id=f"id-{n}")
        await source.start()
        try:
            one, two, three = [await sink.get() for _ in range(3)]
            assert [m.event.data for m in (one, two, three)] == [b"1", b"2", b"3"]
            await settle(source, sink, one)
            await settle(source, sink, two, ok=False)  # nacked: requeued, sent again at once
            again = await sink.get()
            assert again.event.data == b"2" and again.event.id == "id-2"
        finally:
            await source.stop()  # 2 (again) and 3 not acked: the broker keeps them

        sink = Sink()
        source = Amqp(config(rabbitmq, queue), sink)
        await source.start()
        try:
            first, second = await sink.get(), await sink.get()
            assert [first.event.id, second.event.id] == ["id-2", "id-3"]  # 1 was acked
            await settle(source, sink, first)
            await settle(source, sink, second)
            await until(lambda: sink.messages.empty() and sink.held == 0)
        finally:
            await source.stop()
        assert await ready(rabbitmq.url, queue) == 0

    asyncio.run(main())


def test_the_broker_keeps_what_the_trigger_has_no_room_for(rabbitmq: RabbitMQ, queue: str) -> None:
    async def main() -> None:
        sink = Sink(limit=2)
        source = Amqp(config(rabbitmq, queue), sink)
        source.backlog_every = 0.05
        await source.check()
        await publish(rabbitmq.url, queue, *[str(n).encode() for n in range(5)])
        await source.start()
        try:
            held = [await sink.get(), await sink.get()]
            await until(lambda: sink.pending == 3)  # the prefetch is 2: 3 wait in the queue
            assert await ready(rabbitmq.url, queue) == 3
            for message in held:
                await settle(source, sink, message)
            held = [await sink.get(), await sink.get()]
            await until(lambda: sink.pending == 1)
            assert await ready(rabbitmq.url, queue) == 1
            assert [m.event.data for m in held] == [b"2", b"3"]
            for message in held:
                await settle(source, sink, message)
            last = await sink.get()
            assert last.event.data == b"4"
            await until(lambda: sink.pending == 0)
            await settle(source, sink, last)
        finally:
            await source.stop()

    asyncio.run(main())


def test_a_killed_broker_is_connected_again(rabbitmq: RabbitMQ, queue: str) -> None:
    async def main() -> None:
        sink = Sink()
        source = Amqp(config(rabbitmq, queue), sink)
        source.retry_max = 0.5
        await source.check()
        await source.start()
        try:
            await publish(rabbitmq.url, queue, b"a", transient=True)
            held = await sink.get()
            rabbitmq.kill()  # a crash: the node forgets transient messages
            await until(lambda: sink.states[-1:] == ["failing"])
            assert "lost the AMQP broker" in sink.errors[0]
            await source.ack(held)  # its channel is gone: dropped, not raised
            await sink.done()
            await asyncio.to_thread(rabbitmq.start)
            await until(lambda: sink.states[-1:] == ["running"], timeout=15.0)
            await publish(rabbitmq.url, queue, b"c")
            assert (await sink.get()).event.data == b"c"
        finally:
            await source.stop()

    asyncio.run(main())


def test_a_restarted_broker_sends_again_what_was_not_acked(rabbitmq: RabbitMQ, queue: str) -> None:
    async def main() -> None:
        sink = Sink()
        source = Amqp(config(rabbitmq, queue), sink)
        source.retry_max = 0.5
        await source.check()
        await source.start()
        try:
            await publish(rabbitmq.url, queue, b"a", b"b")
            await settle(source, sink, await sink.get())
            held = await sink.get()
            await asyncio.to_thread(rabbitmq.stop)
            await until(lambda: sink.states[-1:] == ["failing"])
            await source.ack(held)
            await sink.done()
            await asyncio.to_thread(rabbitmq.start)
            await until(lambda: sink.states[-1:] == ["running"], timeout=15.0)
            assert sink.states[0] == "running" and "failing" in sink.states
            again = await sink.get()
            assert again.event.data == b"b"  # not acked before the restart; "a" was
            await settle(source, sink, again)
            await publish(rabbitmq.url, queue, b"c")
            await settle(source, sink, await sink.get())
            await until(lambda: sink.held == 0)
        finally:
            await source.stop()
        assert await ready(rabbitmq.url, queue) == 0

    asyncio.run(main())
