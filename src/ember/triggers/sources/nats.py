"""NATS as an event source, two ways:

- `NatsCore` (type `nats`) subscribes to a subject: at most once, as core NATS is. A message
  sent while no subscriber listens, or dropped by a slow one, is gone; ack and nack do nothing.
- `JetStream` (type `jetstream`, in jetstream.py) reads a stream through a durable pull
  consumer: at least once.

Each session is one connection (nats-py's own reconnecting is off): when it breaks,
`keep_connected` reports the trigger failing and connects again. A message that is itself a
CloudEvent (binary mode: `ce-*` headers; structured: content type application/cloudevents+json)
keeps its attributes.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from ember.triggers.base import (
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

log = logging.getLogger("ember.triggers.nats")

SCHEMES = ("nats", "tls", "ws", "wss")
CONNECT_TIMEOUT = 2  # s for one attempt at one server (nats-py takes whole seconds)
CHECK_TIMEOUT = 3.0  # s for `check` to connect and ask
PING_INTERVAL, PINGS = 5, 3  # a server silent for about 15 s is taken for gone
# What nats-py may buffer for a core subscription beyond what the trigger holds; past it the
# client drops messages (a slow consumer).
PENDING_MSGS, PENDING_BYTES = 1024, 16 * 2**20
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


class _Nats(abc.ABC):
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
        """What `check` asks of the server once connected (JetStream: that the stream is)."""
        return None

    async def start(self) -> None:
        self._task = reading(self.events, self._session)

    async def stop(self) -> None:
        await stopped(self._task)
        self._task = None

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
        """The connection is gone: a session waiting on something other than the
        connection (JetStream's pulls) ends now."""
        self._lost()

    def _lost(self) -> None:
        """Called when the connection closed (JetStream ends its waiting session)."""
        return None

    async def _session(self) -> None:
        nc = await self._connect()
        try:
            await self._read(nc)
        except nats.errors.ConnectionClosedError:
            raise ConnectionError(f"lost {self._server}: {self._why(nc.last_error)}") from None
        finally:
            await nc.close()

    @abc.abstractmethod
    async def _read(self, nc: Client) -> None:
        """Read the session's messages until the connection ends."""

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
