"""JetStream as an event source (type `jetstream`): a stream read through a durable pull
consumer, at least once. A message is acked when Ember is done with it and sent again after
`ack_wait` otherwise. The connection, reconnects and CloudEvents handling are nats.py's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, ClassVar, cast

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError, ServiceUnavailableError

from ember.triggers.base import Event, Events, Message, TriggerError, int_field, only, text_field
from ember.triggers.sources.nats import (
    CHECK_TIMEOUT,
    JETSTREAM_TYPE,
    _cloudevent,
    _name,
    _Nats,
    _subject,
    _urls,
)

API_TIMEOUT = 5.0  # s for a JetStream API answer
PULL_EXPIRES_NS = 5_000_000_000  # a pull request waits this long for messages, then ends
MAX_ACK_PENDING = 10_000  # unacked messages JetStream lets the consumer have out at once


def _jetstream_metadata(reply: str) -> tuple[str, str, str, str]:
    """(times delivered, stream sequence, timestamp in ns, pending) from a JetStream message's
    reply subject: $JS.ACK.[<domain>.<account>.]<stream>.<consumer>.<delivered>.<stream seq>.
    <consumer seq>.<ns>.<pending>[.<random>]."""
    t = reply.split(".")
    if len(t) == 9:
        return t[4], t[5], t[7], t[8]
    return t[6], t[7], t[9], t[10]


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
        self._pulls: _Pulls | None = None  # the session's open pull requests

    def _lost(self) -> None:
        if self._pulls is not None:  # a session waiting on its pulls ends now
            self._pulls.fail(nats.errors.ConnectionClosedError())

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
