"""Each broker's trigger end to end: a real `ember up`, a real broker started here on 127.0.0.1
(tests/brokers), a function deployed with the trigger in its ember.yaml. Messages published
with the broker's own client reach the function as CloudEvents, the trigger counts them, and
(for the brokers that acknowledge) a failing one is handed to the async queue and acked there.
The sources' finer behaviour (redelivery, back-pressure, reconnects) is in tests/unit."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiomqtt
import asyncpg
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NatsClient

from tests.brokers.mosquitto import Mosquitto
from tests.brokers.postgres import Postgres
from tests.brokers.rabbitmq import RabbitMQ
from tests.brokers.redis import RedisServer
from tests.integration.conftest import EmberServer, wait_for
from tests.integration.test_triggers import Recorder, deploy, triggers
from tests.natsserver import NatsServer

Publish = Callable[[list[bytes]], None]


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.http.shutdown()
    rec.http.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmberServer]:
    srv = EmberServer(tmp_path_factory.mktemp("home"), []).start()
    yield srv
    code = srv.stop()
    srv.http.close()
    srv.api.close()
    assert code == 0, srv.output()


@contextlib.contextmanager
def _mqtt(directory: Path) -> Iterator[tuple[str, Publish]]:
    with Mosquitto(directory) as broker:

        def publish(bodies: list[bytes]) -> None:
            async def send() -> None:
                host, port = broker.url.removeprefix("mqtt://").split(":")
                async with aiomqtt.Client(host, int(port)) as client:
                    for body in bodies:
                        await client.publish("plant/7/temperature", body, qos=1)

            asyncio.run(send())

        yield f"{{type: mqtt, url: '{broker.url}', topic: 'plant/+/temperature'}}", publish


@contextlib.contextmanager
def _redis(directory: Path) -> Iterator[tuple[str, Publish]]:
    with RedisServer(directory) as broker:

        def publish(bodies: list[bytes]) -> None:
            async def send() -> None:
                client = aioredis.from_url(broker.url)
                try:
                    for body in bodies:
                        await client.xadd("orders", {"data": body})
                finally:
                    await client.aclose()

            asyncio.run(send())

        yield f"{{type: redis, url: '{broker.url}', stream: orders}}", publish


@contextlib.contextmanager
def _amqp(directory: Path) -> Iterator[tuple[str, Publish]]:
    with RabbitMQ(directory) as broker:

        def publish(bodies: list[bytes]) -> None:
            async def send() -> None:
                connection = await aio_pika.connect(broker.url)
                async with connection:
                    channel = await connection.channel()
                    for body in bodies:
                        message = aio_pika.Message(body, message_id=uuid.uuid4().hex)
                        await channel.default_exchange.publish(message, routing_key="jobs")

            asyncio.run(send())

        yield f"{{type: amqp, url: '{broker.url}', queue: jobs}}", publish


@contextlib.contextmanager
def _postgres(directory: Path) -> Iterator[tuple[str, Publish]]:
    with Postgres() as broker:

        def publish(bodies: list[bytes]) -> None:
            async def send() -> None:
                conn = await asyncpg.connect(broker.url)
                try:
                    for body in bodies:
                        await conn.execute("SELECT pg_notify('orders', $1)", body.decode())
                finally:
                    await conn.close()

            asyncio.run(send())

        yield f"{{type: postgres, url: '{broker.url}', channel: orders}}", publish


@contextlib.contextmanager
def _nats(directory: Path) -> Iterator[tuple[str, Publish]]:
    with NatsServer(directory) as broker:

        def publish(bodies: list[bytes]) -> None:
            async def send() -> None:
                nc = NatsClient()
                await nc.connect(broker.url)
                try:
                    for body in bodies:
                        await nc.publish("sensors.7.temp", body)
                    await nc.flush()
                finally:
                    await nc.close()

            asyncio.run(send())

        yield f"{{type: nats, url: '{broker.url}', subject: 'sensors.*.temp'}}", publish


SOURCES: dict[str, Callable[[Path], contextlib.AbstractContextManager[tuple[str, Publish]]]] = {
    "mqtt": _mqtt,
    "redis": _redis,
    "amqp": _amqp,
    "postgres": _postgres,
    "nats": _nats,
}
DURABLE = {"mqtt", "redis", "amqp"}  # acknowledged; nats core and NOTIFY are at most once
TYPES = {
    "mqtt": "io.ember.mqtt.message",
    "redis": "io.ember.redis.message",
    "amqp": "io.ember.amqp.message",
    "postgres": "io.ember.postgres.notification",
    "nats": "io.ember.nats.message",
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_messages_from_the_broker_reach_the_function_as_cloudevents(
    kind: str, server: EmberServer, recorder: Recorder, tmp_path: Path
) -> None:
    with SOURCES[kind](tmp_path / "broker") as (trigger, publish):
        name = f"from-{kind}"
        manifest = f"async: {{retries: 0}}\ntriggers: [{trigger}]"
        done = deploy(server, tmp_path, name, recorder.url, manifest)
        assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
        wait_for(lambda: triggers(server, name)[kind]["state"] == "running", 20, "running")
        marks = [f"{kind}-{uuid.uuid4().hex}".encode() for _ in range(3)]
        bodies = [*marks, b"please fail"] if kind in DURABLE else marks
        publish(bodies)

        def got(body: bytes) -> list[dict[str, Any]]:
            return [s for s in recorder.seen if s["body"] == body.decode()]

        for mark in marks:
            wait_for(lambda mark=mark: len(got(mark)) == 1, 20, f"{mark!r} at the function")
        seen = [got(mark)[0]["headers"] for mark in marks]
        assert all(h["ce-specversion"] == "1.0" and h["ce-type"] == TYPES[kind] for h in seen)
        assert all(h["ce-source"].startswith(kind.replace("postgres", "postgresql")) for h in seen)
        assert len({h["ce-id"] for h in seen}) == 3
        wait_for(lambda: triggers(server, name)[kind]["delivered"] == 3, 20, "3 delivered")
        if kind in DURABLE:  # the failing one went to the queue (dead: retries 0), then acked
            wait_for(lambda: triggers(server, name)[kind]["queued"] == 1, 20, "1 queued")
            dead = server.api.get(f"/api/v1/functions/{name}/dlq").json()["invocations"]
            assert len(dead) == 1 and dead[0]["attempts"][0]["status"] == 500
        view = triggers(server, name)[kind]
        assert (view["failed"], view["state"]) == (0, "running")
        server.cli("rm", name)
