"""AMQP 0-9-1 (RabbitMQ) queues as an event source, with aio-pika: at least once.

Each session is one connection and one channel consuming the queue with manual acks. `ack` is
basic.ack; `nack` is basic.nack with requeue, so the broker sends the message again. When a
connection breaks, the broker requeues what it had sent and was not acked; an ack for such a
message is dropped (it comes again).

Back-pressure: the channel's QoS (prefetch count) is the trigger's room when it first connects,
so the broker never has more messages out to Ember than the trigger takes; the rest wait in
the queue. The queue's ready messages are reported as the backlog every BACKLOG_EVERY seconds.

With `declare: true` (the default) the queue is declared durable if missing, and bound to
`exchange` with `routing_key` when those are set (the exchange must exist: its type is the
publisher's choice). With `declare: false` the queue must exist, as it is.

Ids: AMQP has no id of its own. The id is the message's `message_id` property when the
publisher set one (the same on redelivery, so a function can deduplicate), else a random UUID,
which differs on redelivery: a delivery tag is only a position on one channel, and a digest of
the body would give equal ids to distinct messages with equal bodies. A message that is a
CloudEvent keeps its attributes: binary mode, with headers named `cloudEvents:ATTR` or
`cloudEvents_ATTR` (the CloudEvents AMQP binding) or `ce-ATTR` (the RabbitMQ binding Knative
and the CloudEvents SDK write) and the content type as `datacontenttype`; structured mode, with
the content type application/cloudevents+json.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import (
    AMQPError,
    ChannelClosed,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)

from ember.triggers.base import (
    BACKOFF_MAX,
    Event,
    Events,
    Message,
    TriggerError,
    describe,
    only,
    reading,
    stopped,
    text_field,
)
from ember.triggers.envelope import content_mode, from_http, now

log = logging.getLogger("ember.triggers.amqp")

KEYS = ("url", "queue", "declare", "exchange", "routing_key")
TYPE = "io.ember.amqp.message"
CONNECT_TIMEOUT = 3.0  # s to connect and log in
PREFETCH_MAX = 65535  # the largest prefetch count AMQP 0-9-1 carries
PREFIXES = ("cloudEvents:", "cloudEvents_", "ce-")  # binary-mode CloudEvents headers
# What goes into a header value as is when it is handed to the HTTP binding's reader (which
# percent-decodes): printable ASCII but '"' and '%'.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_GONE = (AMQPError, ChannelInvalidStateError, ConnectionError)  # the channel an ack needs is gone


class Amqp:
    type: ClassVar[str] = "amqp"
    durable: ClassVar[bool] = True
    backlog_every = 5.0  # s between reports of the queue's ready messages
    retry_max = BACKOFF_MAX  # the longest wait between reconnects (tests shorten it)

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        only(config, KEYS)
        url = text_field(config, "url")
        _address(url)
        queue = text_field(config, "queue")
        if len(queue.encode()) > 255:
            raise TriggerError("queue", "is longer than AMQP allows (255 bytes)")
        declare = config.get("declare", True)
        if not isinstance(declare, bool):
            raise TriggerError("declare", f"must be true or false, not {declare!r}")
        if declare and queue.startswith("amq."):
            raise TriggerError("queue", "names starting with 'amq.' are the broker's own")
        exchange = text_field(config, "exchange", "")
        routing_key = text_field(config, "routing_key", "")
        if exchange and not declare:
            raise TriggerError("exchange", "binds the queue, which needs `declare: true`")
        if "routing_key" in config and not exchange:
            raise TriggerError("routing_key", "needs an `exchange:` to bind the queue to")
        return {
            "url": url,
            "queue": queue,
            "declare": declare,
            "exchange": exchange,
            "routing_key": routing_key,
        }

    def __init__(self, config: dict[str, Any], events: Events) -> None:
        self._config = config
        self._events = events
        self._where, vhost = _address(config["url"])
        self._source = f"{self._where}{vhost}/{quote(config['queue'], safe='')}"
        self._prefetch = 0  # the trigger's room when it first connected
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> None:
        """Connect, log in, declare (or find) the queue and bind it, disconnect."""
        connection = await self._connect()
        try:
            await self._queue(await connection.channel())
        finally:
            await connection.close()

    async def start(self) -> None:
        self._task = reading(self._events, self._session, self.retry_max)

    async def stop(self) -> None:
        await stopped(self._task)
        self._task = None

    async def ack(self, message: Message) -> None:
        await _settle(message, requeue=None)

    async def nack(self, message: Message) -> None:
        await _settle(message, requeue=True)

    async def _connect(self) -> aio_pika.abc.AbstractConnection:
        try:
            return await aio_pika.connect(self._config["url"], timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, AMQPError) as exc:
            raise TriggerError(
                "url",
                f"cannot reach the AMQP broker at {self._where}: {describe(exc)}; is the broker "
                "running, and are the user, password and vhost right?",
            ) from None

    async def _session(self) -> None:
        connection = await self._connect()
        closed: list[BaseException | None] = []
        connection.close_callbacks.add(lambda _sender, exc: closed.append(exc))
        try:
            channel = await connection.channel()
            self._prefetch = min(max(self._prefetch, self._events.room, 1), PREFETCH_MAX)
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await self._queue(channel)
            self._events.connected()
            self._events.backlog(_ready(queue))
            reporter = asyncio.create_task(self._report(channel))
            try:
                await self._consume(queue)
            finally:
                reporter.cancel()
                await asyncio.wait({reporter})
        finally:
            await connection.close()
        reason = describe(closed[0]) if closed and closed[0] else "the channel closed"
        raise ConnectionError(f"lost the AMQP broker at {self._where}: {reason}")

    async def _consume(self, queue: AbstractQueue) -> None:
        """Hand messages over until the channel closes."""
        async with queue.iterator() as incoming:
            async for received in incoming:
                key = received.routing_key or ""
                await self._events.put(Message(self._event(received), received, key))

    async def _queue(self, channel: AbstractChannel) -> AbstractQueue:
        config = self._config
        name = config["queue"]
        try:
            if not config["declare"]:
                return await channel.declare_queue(name, passive=True)
            queue = await channel.declare_queue(name, durable=True)
        except ChannelNotFoundEntity:
            raise TriggerError(
                "queue",
                f"there is no queue {name!r} at {self._where}: create it, or drop "
                "`declare: false` for Ember to declare it",
            ) from None
        except ChannelPreconditionFailed as exc:
            raise TriggerError(
                "queue",
                f"queue {name!r} exists with other settings ({exc}): set "
                "`declare: false` to use it as it is",
            ) from None
        except ChannelClosed as exc:
            raise TriggerError("queue", f"the broker refused queue {name!r}: {exc}") from None
        if config["exchange"]:
            try:
                await queue.bind(config["exchange"], config["routing_key"])
            except ChannelClosed as exc:
                raise TriggerError(
                    "exchange",
                    f"cannot bind queue {name!r} to exchange {config['exchange']!r} "
                    f"(it must exist; declare it where the publisher is set up): {exc}",
                ) from None
        return queue

    async def _report(self, channel: AbstractChannel) -> None:
        """Report the queue's ready messages every `backlog_every` s until the channel closes."""
        while True:
            await asyncio.sleep(self.backlog_every)
            try:
                queue = await channel.declare_queue(self._config["queue"], passive=True)
            except _GONE:
                return
            self._events.backlog(_ready(queue))

    def _event(self, received: AbstractIncomingMessage) -> Event:
        ctype = received.content_type or ""
        event = _cloudevent(received.headers, ctype, received.body)
        if event is not None:
            return event
        when = received.timestamp
        return Event(
            id=received.message_id or str(uuid.uuid4()),
            source=self._source,
            type=TYPE,
            time=_rfc3339(when) if when is not None else now(),
            subject=received.routing_key or "",
            datacontenttype=ctype,
            data=received.body,
        )


def _cloudevent(headers: Mapping[str, Any], ctype: str, body: bytes) -> Event | None:
    """The CloudEvent a message carries (binary or structured mode), else None."""
    fields = [(b"content-type", ctype.encode("utf-8", "replace"))] if ctype else []
    for name, value in headers.items():
        prefix = next((p for p in PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            header = "ce-" + name[len(prefix) :].lower()
            fields.append((header.encode(), quote(_text(value), safe=_SAFE).encode()))
    if content_mode(fields) not in ("binary", "structured"):
        return None
    try:
        (event,) = from_http(fields, body)
    except ValueError as exc:
        log.warning("an AMQP message is a malformed CloudEvent, taken as plain: %s", exc)
        return None
    return event


async def _settle(message: Message, requeue: bool | None) -> None:
    received = message.token
    if not isinstance(received, AbstractIncomingMessage):
        raise TypeError(f"not a message of an AMQP trigger: {received!r}")
    try:
        if requeue is None:
            await received.ack()
        else:
            await received.nack(requeue=requeue)
    except _GONE as exc:  # its channel closed: the broker sends it again
        log.debug("could not settle an AMQP message (%s): it will be redelivered", exc)


def _ready(queue: AbstractQueue) -> int:
    """The queue's ready messages when it was (passively) declared."""
    declared = queue.declaration_result
    return (declared.message_count or 0) if declared is not None else 0


def _address(url: str) -> tuple[str, str]:
    """`amqp://host:port` (no credentials) and the vhost's path ("" for the default one)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise TriggerError("url", "has an invalid port") from None
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        shown = parts._replace(netloc=parts.hostname or "").geturl()
        raise TriggerError(
            "url", f"must be amqp://user:password@host:port/vhost (or amqps://), not {shown!r}"
        )
    port = port or (5671 if parts.scheme == "amqps" else 5672)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    vhost = parts.path if parts.path not in ("", "/") else ""
    return f"{parts.scheme}://{host}:{port}", vhost


def _text(value: object) -> str:
    """A header's value as text (AMQP headers are typed)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return _rfc3339(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _rfc3339(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # AMQP timestamps are seconds since the epoch, UTC
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
