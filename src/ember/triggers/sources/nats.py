"""NATS as an event source, two ways:

- `NatsCore` (type `nats`) subscribes to a subject: at most once, as core NATS is. A message
  sent while no subscriber listens, or dropped by a slow one, is gone; ack and nack do nothing.
- `JetStream` (type `jetstream`) reads a stream through a durable pull consumer: at least once.
  A message is acked when Ember is done with it and sent again after `ack_wait` otherwise.

Each session is one connection (nats-py's own reconnecting is off): when it breaks,
`keep_connected` reports the trigger failing and connects again. A message that is itself a
CloudEvent (binary mode: `ce-*` headers; structured: content type application/cloudevents+json)
keeps its attributes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar, cast
from urllib.parse import urlsplit

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError, ServiceUnavailableError

from ember.triggers.base import (
    Event,
    Events,
    Message,
    TriggerError,
    describe,
    int_field,
    keep_connected,
    only,
    text_field,
)

log = logging.getLogger("ember.triggers.nats")

SCHEMES = ("nats", "tls", "ws", "wss")
CONNECT_TIMEOUT = 2  # s for one attempt at one server (nats-py takes whole seconds)
CHECK_TIMEOUT = 3.0  # s for `check` to connect and ask
API_TIMEOUT = 5.0  # s for a JetStream API answer
PING_INTERVAL, PINGS = 5, 3  # a server silent for about 15 s is taken for gone
# What nats-py may buffer for a core subscription beyond what the trigger holds; past it the
# client drops messages (a slow consumer).
PENDING_MSGS, PENDING_BYTES = 1024, 16 * 2**20
PULL_EXPIRES_NS = 5_000_000_000  # a pull request waits this long for messages, then ends
MAX_ACK_PENDING = 10_000  # unacked messages JetStream lets the consumer have out at once
WARN_EVERY = 10.0  # s between warnings about dropped core messages
NATS_TYPE, JETSTREAM_TYPE = "io.ember.nats.message", "io.ember.jetstream.message"
STRUCTURED = "application/cloudevents+json"
ATTRIBUTES = ("id", "source", "type", "subject", "time", "datacontenttype", "dataschema")
_TOKEN = r"([^.\s*>]+|\*)"
_SUBJECT = re.compile(rf"{_TOKEN}(\.{_TOKEN})*(\.>)?|>")


# ---- validation ----
def _urls(config: Mapping[str, Any]) -> str:
    urls = [part.strip() for part in text_field(config, "url").split(",")]
    for url in urls:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError as exc:
            raise TriggerError("url", f"{url!r} is not a URL: {exc}") from None
        if parts.scheme not in SCHEMES or not parts.hostname or parts.path not in ("", "/"):
            raise TriggerError(
                "url", f"{url!r} must look like nats://host:4222 (several: comma-separated)"
            )
    return ",".join(urls)


def _subject(config: Mapping[str, Any], key: str, default: str | None = None) -> str:
    """A subject to subscribe to: tokens between dots, `*` one whole token, `>` the rest."""
    value = text_field(config, key, default)
    if value != default and not _SUBJECT.fullmatch(value):
        raise TriggerError(
            key,
            f"{value!r} is not a NATS subject: tokens between dots are non-empty and have no "
            "spaces; `*` stands for one whole token, `>` for all the rest, last",
        )
    return value


def _name(config: Mapping[str, Any], key: str, default: str | None = None) -> str:
    """A stream or consumer name: no spaces, dots, wildcards or slashes."""
    value = text_field(config, key, default)
    if any(c.isspace() or c in ".*>/\\" for c in value):
        raise TriggerError(key, f"{value!r} may not hold spaces, '.', '*', '>', '/' or '\\'")
    return value


def _server(url: str) -> str:
    """The first server's URL without user and password, for the events' `source`."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


# ---- events ----
def _cloudevent(event: Event, headers: Mapping[str, str]) -> Event:
    """`event` with what the message says of itself: its content type, and if it is a
    CloudEvent its attributes (`ce-*` headers, or the whole body in structured mode)."""
    extensions: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower == "content-type":
            if value.startswith(STRUCTURED):
                return _structured(event)
            event.datacontenttype = value
        elif lower.startswith("ce-"):
            attribute = lower[3:]
            if attribute in ATTRIBUTES:
                setattr(event, attribute, value)
            elif attribute != "specversion":
                extensions[attribute] = value
    if extensions:
        event.extensions = {**event.extensions, **extensions}
    return event


def _structured(event: Event) -> Event:
    """The event a JSON-format CloudEvent body describes (`event` unchanged if it is not one)."""
    try:
        body = msgspec.json.decode(event.data)
        data = base64.b64decode(body.get("data_base64", ""), validate=True)
    except (msgspec.DecodeError, AttributeError, TypeError, binascii.Error):
        return event
    event.datacontenttype, extensions = "", dict(event.extensions)
    for key, value in body.items():
        if key in ATTRIBUTES:
            setattr(event, key, str(value))
        elif key not in ("data", "data_base64", "specversion"):
            extensions[key] = str(value)
    if "data" in body:
        value, kind = body["data"], event.datacontenttype
        textual = isinstance(value, str) and bool(kind) and "json" not in kind
        data = value.encode() if textual else msgspec.json.encode(value)
        event.datacontenttype = kind or "application/json"
    event.data, event.extensions = data, extensions
    return event


def _jetstream_metadata(reply: str) -> tuple[str, str, str, str]:
    """(times delivered, stream sequence, timestamp in ns, pending) from a JetStream message's
    reply subject: $JS.ACK.[<domain>.<account>.]<stream>.<consumer>.<delivered>.<stream seq>.
    <consumer seq>.<ns>.<pending>[.<random>]."""
    t = reply.split(".")
    if len(t) == 9:
        return t[4], t[5], t[7], t[8]
    return t[6], t[7], t[9], t[10]


class _Nats:
    """What both sources share: the servers, a connection per session, the reading task."""

    type: ClassVar[str]
    durable: ClassVar[bool]

    def __init__(self, config: dict[str, Any], events: Events) -> None:
        self.config, self.events = config, events
        self._urls: list[str] = config["url"].split(",")
        self._server = _server(self._urls[0])
        self._nc = Client()  # this session's connection (acks go through it)
        self._task: asyncio.Task[None] | None = None
        self._error: Exception | None = None  # the last one nats-py reported
        self._pulls: _Pulls | None = None  # a JetStream session's open pull requests
        self._second, self._stamp = -1, ""

    async def check(self) -> None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                nc = await self._connect()
        except TimeoutError:
            raise TriggerError(
                "url",
                f"cannot reach {self.config['url']}: no answer in {CHECK_TIMEOUT:.0f} s; "
                "is nats-server running there?",
            ) from None
        except ConnectionError as exc:
            raise TriggerError("url", f"{exc}; is nats-server running there?") from None
        try:
            await self._check(nc)
        finally:
            await nc.close()

    async def _check(self, nc: Client) -> None:
        pass

    async def start(self) -> None:
        self._task = asyncio.create_task(
            keep_connected(self.events, self._session), name=f"trigger {self.events.id}"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def _connect(self) -> Client:
        nc = self._nc = Client()
        self._error = None
        try:
            await nc.connect(
                self._urls,
                error_cb=self._on_error,
                closed_cb=self._on_closed,
                name=f"ember-trigger-{self.events.function}-{self.events.name}",
                allow_reconnect=False,  # a lost connection ends the session
                connect_timeout=CONNECT_TIMEOUT,
                max_reconnect_attempts=1,  # each server is tried twice at most
                reconnect_time_wait=0,
                ping_interval=PING_INTERVAL,
                max_outstanding_pings=PINGS,
            )
        except BaseException as exc:
            await nc.close()
            if not isinstance(exc, Exception):
                raise
            raise ConnectionError(f"cannot reach {self.config['url']}: {self._why(exc)}") from None
        return nc

    def _why(self, exc: BaseException | None) -> str:
        """What went wrong: `exc`, or the error nats-py reported before it when `exc` says
        no more than "no servers"."""
        if exc is None or isinstance(exc, nats.errors.NoServersError):
            return describe(self._error) if self._error else "the server closed the connection"
        return describe(exc)

    async def _on_error(self, exc: Exception) -> None:
        self._error = exc

    async def _on_closed(self) -> None:
        """The connection is gone: a session waiting on its pulls ends now."""
        if self._pulls is not None:
            self._pulls.fail(nats.errors.ConnectionClosedError())

    async def _session(self) -> None:
        nc = await self._connect()
        try:
            await self._read(nc)
        except nats.errors.ConnectionClosedError:
            raise ConnectionError(f"lost {self._server}: {self._why(nc.last_error)}") from None
        finally:
            await nc.close()

    async def _read(self, nc: Client) -> None:
        raise NotImplementedError

    def _time(self, ns: int) -> str:
        """RFC 3339 in UTC to the microsecond (the date part is reused within a second)."""
        second, rest = divmod(ns, 1_000_000_000)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{rest // 1000:06d}Z"


class NatsCore(_Nats):
    """Messages published on `subject` (wildcards allowed), as they come: at most once.

    Core NATS keeps nothing: ack and nack do nothing, and what is published while the trigger
    is stopped or disconnected is lost. With `queue` set, every subscriber in that queue group
    (the trigger on each Ember server, or several triggers naming the same group) gets a share
    of the messages, each message going to one of them; without it each gets every message.
    The server pushes, so when the function falls behind nats-py buffers up to PENDING_MSGS
    messages (PENDING_BYTES bytes) beyond the trigger's own limit and drops the rest: each
    drop is counted in `dropped` and logged (a warning at most every WARN_EVERY s); the
    trigger stays `running`, as it still reads. Use `jetstream` for messages that must not be
    lost.
    """

    type: ClassVar[str] = "nats"
    durable: ClassVar[bool] = False

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        only(config, ("url", "subject", "queue"))
        queue = text_field(config, "queue", "")
        if any(c.isspace() for c in queue):
            raise TriggerError("queue", f"{queue!r} is not a queue group name: no spaces")
        return {"url": _urls(config), "subject": _subject(config, "subject"), "queue": queue}

    def __init__(self, config: dict[str, Any], events: Events) -> None:
        super().__init__(config, events)
        self._source = f"{self._server}/{config['subject']}"
        self._prefix = os.urandom(8).hex()  # ids: this prefix and a count
        self._count = 0
        self.dropped = 0  # messages nats-py threw away as the trigger was too slow
        self._warned, self._warned_at = 0, 0.0

    async def _read(self, nc: Client) -> None:
        subject, queue = self.config["subject"], self.config["queue"]
        sub = await nc.subscribe(
            subject, queue, pending_msgs_limit=PENDING_MSGS, pending_bytes_limit=PENDING_BYTES
        )
        await nc.flush()  # the server has the subscription: what is published now comes
        self.events.connected()
        while True:
            msg = await sub.next_msg(timeout=None)
            await self.events.put(Message(self._event(msg), None, msg.subject))

    def _event(self, msg: Msg) -> Event:
        self._count += 1
        event = Event(
            id=f"{self._prefix}-{self._count}",
            source=self._source,
            type=NATS_TYPE,
            time=self._time(time.time_ns()),
            subject=msg.subject,
            data=msg.data,
        )
        return _cloudevent(event, msg.headers) if msg.headers else event

    async def _on_error(self, exc: Exception) -> None:
        if not isinstance(exc, nats.errors.SlowConsumerError):
            self._error = exc
            return
        self.dropped += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            log.warning(
                "trigger %s of %s: dropped %d NATS messages on %s (%d in all): the function "
                "keeps up with fewer; raise its concurrency or use a jetstream trigger",
                self.events.name, self.events.function, self.dropped - self._warned,
                self.config["subject"], self.dropped,
            )  # fmt: skip
            self._warned, self._warned_at = self.dropped, now

    async def ack(self, message: Message) -> None:
        """Nothing: core NATS has no acknowledgements."""

    async def nack(self, message: Message) -> None:
        """Nothing: core NATS cannot send a message again."""


class JetStream(_Nats):
    """A JetStream stream (optionally only `subject` of it) through the durable pull consumer
    `durable` (by default one named after the trigger), created or updated at each connect.

    Each pull asks for as many messages as the trigger has room for. An event's id is
    "<stream>-<stream sequence>", the same when the message comes again; `deliverycount` says
    how many times it came. Ack and nack answer the message on the current connection; one
    that cannot be answered (the connection is down) comes again after `ack_wait` seconds,
    which should exceed the time the function takes. `deliver` (new: only messages published
    from now; all: the whole stream) applies when the consumer is first created.
    """

    type: ClassVar[str] = "jetstream"
    durable: ClassVar[bool] = True

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        keys = ("url", "stream", "subject", "durable", "deliver", "ack_wait", "max_deliver")
        only(config, keys)
        deliver = text_field(config, "deliver", "new")
        if deliver not in ("new", "all"):
            raise TriggerError("deliver", f"must be new or all, not {deliver!r}")
        max_deliver = int_field(config, "max_deliver", -1, -1, 1_000_000)
        if max_deliver == 0:
            raise TriggerError("max_deliver", "must be -1 (no limit) or at least 1, not 0")
        return {
            "url": _urls(config),
            "stream": _name(config, "stream"),
            "subject": _subject(config, "subject", ""),
            "durable": _name(config, "durable", ""),
            "deliver": deliver,
            "ack_wait": int_field(config, "ack_wait", 30, 1, 86_400),
            "max_deliver": max_deliver,
        }

    def __init__(self, config: dict[str, Any], events: Events) -> None:
        super().__init__(config, events)
        self._stream: str = config["stream"]
        self._consumer: str = config["durable"] or "ember-" + "".join(
            c if c.isalnum() or c in "-_" else "_" for c in events.id
        )
        self._source = f"{self._server}/{self._stream}"

    async def _check(self, nc: Client) -> None:
        try:
            await nc.jetstream(timeout=CHECK_TIMEOUT).stream_info(self._stream)
        except NotFoundError:
            raise TriggerError("stream", self._no_stream()) from None
        except (nats.errors.NoRespondersError, ServiceUnavailableError, TimeoutError):
            raise TriggerError(
                "url",
                f"{self._server} does not answer JetStream requests; is JetStream on "
                "(nats-server -js)?",
            ) from None

    def _no_stream(self) -> str:
        return (
            f"no stream named {self._stream!r} on {self._server}; create it with `nats stream "
            f"add {self._stream} --subjects ...` (or the JetStream API), or fix `stream:`"
        )

    async def _read(self, nc: Client) -> None:
        """Pull requests kept open on an inbox of our own, each message handed over the moment
        it arrives, from the subscription's callback (nats-py's `fetch` returns only once its
        whole batch came or its wait ran out, which holds the first message of a batch back).
        At most `room` messages are asked for at once, so no more arrive than the trigger has
        room for; the pulls are topped up as room frees."""
        js = nc.jetstream(timeout=API_TIMEOUT)
        await self._declare(js)
        pulls = self._pulls = _Pulls(
            nc, f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{self._consumer}"
        )
        events, message = self.events, self._message

        async def arrived(msg: Msg) -> None:
            try:
                if not msg.data and msg.headers and "Status" in msg.headers:
                    if "deleted" in msg.headers.get("Description", "").lower():
                        raise LookupError(f"the consumer {self._consumer} was deleted")
                    pulls.ended(_unfilled(msg, pulls.asked))
                    return
                pulls.came()
                await events.put(message(msg))
                events.backlog(int(_jetstream_metadata(msg.reply)[3]))
                await pulls.top_up(events.room)
            except Exception as exc:  # the session ends with it
                pulls.fail(exc)

        pulls.inbox = (await nc.subscribe(nc.new_inbox(), cb=arrived)).subject
        events.connected()
        while True:
            await pulls.start(await events.free() if pulls.asked == 0 else 0)
            await pulls.wait()

    async def _declare(self, js: JetStreamContext) -> None:
        """Create the consumer, or update it to this config (but for where it started)."""
        deliver = (
            api.DeliverPolicy.NEW if self.config["deliver"] == "new" else api.DeliverPolicy.ALL
        )
        try:
            found = await js.consumer_info(self._stream, self._consumer)
            deliver = found.config.deliver_policy or deliver
        except NotFoundError:
            pass
        config = api.ConsumerConfig(
            name=self._consumer,
            durable_name=self._consumer,
            deliver_policy=deliver,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=float(self.config["ack_wait"]),
            max_deliver=self.config["max_deliver"],
            max_ack_pending=MAX_ACK_PENDING,
            filter_subject=self.config["subject"] or None,
        )
        try:
            await js.add_consumer(self._stream, config)
        except NotFoundError:
            raise LookupError(self._no_stream()) from None

    def _message(self, msg: Msg) -> Message:
        reply = msg.reply
        delivered, sequence, ns, _ = _jetstream_metadata(reply)
        event = Event(
            id=f"{self._stream}-{sequence}",
            source=self._source,
            type=JETSTREAM_TYPE,
            time=self._time(int(ns)),
            subject=msg.subject,
            data=msg.data,
            extensions={"deliverycount": delivered},
        )
        if msg.headers:
            event = _cloudevent(event, msg.headers)
        return Message(event, reply, msg.subject)

    async def ack(self, message: Message) -> None:
        await self._answer(message, b"")  # an empty answer is an ack

    async def nack(self, message: Message) -> None:
        await self._answer(message, b"-NAK")

    async def _answer(self, message: Message, body: bytes) -> None:
        # The reply subject names the consumer and message, so any connection may answer.
        try:
            await self._nc.publish(cast(str, message.token), body)
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError):
            pass  # not answered: JetStream sends the message again after ack_wait


_PULL = msgspec.json.Encoder()


def _unfilled(status: Msg, asked: int) -> int:
    """How many messages a pull request's end (a status message) says will not come: an
    expired or cut request's `Nats-Pending-Messages`; a heartbeat (100) ends nothing."""
    headers = status.headers or {}
    if headers.get("Status") == "100":
        return 0
    pending = headers.get("Nats-Pending-Messages")
    return int(pending) if pending and pending.isdigit() else asked


class _Pulls:
    """The pull requests a JetStream session has open: how many messages they may still bring
    (`asked`), and when none may (then the session asks again once the trigger has room)."""

    def __init__(self, nc: Client, subject: str) -> None:
        self.nc, self.subject, self.inbox = nc, subject, ""
        self.asked = 0
        self.most = 1  # the most room seen: top up once half of it is free
        self.last = time.monotonic()
        self.idle = asyncio.Event()
        self.error: BaseException | None = None

    async def start(self, n: int) -> None:
        self.idle.clear()
        if n > 0:
            self.most = max(self.most, n)
            await self._ask(n)

    async def top_up(self, room: int) -> None:
        more = room - self.asked
        if self.asked > 0 and more >= max(1, self.most // 2):
            await self._ask(more)

    async def _ask(self, n: int) -> None:
        self.asked += n
        request = _PULL.encode({"batch": n, "expires": PULL_EXPIRES_NS})
        await self.nc.publish(self.subject, request, reply=self.inbox)

    def came(self) -> None:
        self.asked -= 1
        self.last = time.monotonic()
        if self.asked <= 0:
            self.asked = 0
            self.idle.set()

    def ended(self, unfilled: int) -> None:
        """A request ended (expired, cut) with `unfilled` messages it will not bring."""
        self.asked = max(0, self.asked - unfilled)
        if self.asked == 0:
            self.idle.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.idle.set()

    async def wait(self) -> None:
        """Until nothing more is asked for (or the session failed). Requests whose ends were
        lost (nothing arrived for longer than a request lives) count as ended."""
        patience = PULL_EXPIRES_NS / 1e9 + API_TIMEOUT
        while not self.idle.is_set():
            try:
                await asyncio.wait_for(self.idle.wait(), patience)
            except TimeoutError:
                if time.monotonic() - self.last > patience:
                    self.ended(self.asked)
        if self.error is not None:
            raise self.error
