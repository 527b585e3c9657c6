"""Redis Streams (Redis 6.2 or later) as an event source, as one consumer of a consumer group.

Reading: the group (`group:`, default "ember") is created with MKSTREAM at the start of each
session if missing, at `start:` ("$": only entries added from then on; "0": the whole stream).
A session first reads this consumer's own pending entries (delivered before, never acked: what
a previous session had handed over), then new ones (`>`) with COUNT the trigger's room and
BLOCK BLOCK_MS; while the trigger has no room it reads nothing, so no more entries are delivered
to this consumer than the trigger takes. Entries the trigger still holds from an earlier
session are not handed over twice.

ack is XACK. nack leaves the entry pending: this consumer reads its own pending entries again
NACK_PAUSE seconds later (a new session does too). An entry another consumer of the group left
pending for `claim_after` seconds (a consumer that died) is taken over with XAUTOCLAIM. So that
no one takes over what this source holds while a function is slow, it resets the idle time of
those entries (XCLAIM JUSTID to itself) every TICK seconds.

Event: id `<stream>-<entry id>`, stable across redelivery; time the entry id's milliseconds;
subject the stream; data the field `data` if the entry has one (its other fields become
extensions where the name allows), else all fields as a JSON object of strings
(application/json). Fields named `ce_<attribute>` (ce_id, ce_type, ce_source, ce_time,
ce_datacontenttype, ...) set those attributes, other `ce_` fields are extensions: the entry is
read as a binary-mode CloudEvent, its missing attributes the defaults above (ce_specversion
may be left out); if that is malformed (a ce_time that is no RFC 3339 time...), it is taken
as plain.

Backlog, every TICK seconds: the group's pending entries plus its lag (Redis 7 reports the lag;
6.2 does not, and then only pending entries count), and the time of the oldest of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ember.triggers.base import (
    Event,
    Events,
    Message,
    TriggerError,
    int_field,
    only,
    reading,
    stopped,
    text_field,
)
from ember.triggers.envelope import RESERVED, from_http

log = logging.getLogger("ember.triggers.redis")

KEYS = ("url", "stream", "group", "consumer", "start", "claim_after")
CONNECT_TIMEOUT = 3.0
BLOCK_MS = 1000  # how long one XREADGROUP waits for new entries
SOCKET_TIMEOUT = 10.0  # s for any reply (more than BLOCK_MS)
TICK = 5.0  # s between backlog reports, idle-time resets and takeovers
NACK_PAUSE = 1.0  # s before a nacked entry is read again
ROOM_POLL = 0.02  # s between looks at the room while the trigger is full
TYPE = "io.ember.redis.message"
Fields = dict[bytes, bytes]
_NAME = re.compile(r"[a-z0-9]+")  # a valid CloudEvents extension name
# What goes into a header value as is when it is handed to the HTTP binding's reader (which
# percent-decodes): printable ASCII but '"' and '%'.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


class RedisStreams:
    type: ClassVar[str] = "redis"
    durable: ClassVar[bool] = True

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        only(config, KEYS)
        url = text_field(config, "url")
        _address(url)
        group = text_field(config, "group", "ember")
        if not group:
            raise TriggerError("group", "must not be empty (the default is ember)")
        start = config.get("start", "$")
        start = "0" if start == 0 and not isinstance(start, bool) else start
        if start not in ("$", "0"):
            raise TriggerError("start", f'must be "$" (new entries only) or "0", not {start!r}')
        return {
            "url": url,
            "stream": text_field(config, "stream"),
            "group": group,
            "consumer": text_field(config, "consumer", ""),
            "start": start,
            "claim_after": int_field(config, "claim_after", 60, 1, 7 * 24 * 3600),
        }

    def __init__(self, config: dict[str, Any], events: Events) -> None:
        self._config = config
        self._events = events
        self._url = config["url"]
        self._stream: str = config["stream"]
        self._group: str = config["group"]
        self._consumer: str = config["consumer"] or f"ember-{events.id}"
        self._source = f"{_address(self._url)}/{self._stream}"
        self._claim_ms = config["claim_after"] * 1000
        self._task: asyncio.Task[None] | None = None
        self._client: aioredis.Redis | None = None
        self._held: set[str] = set()  # entry ids handed over and not yet settled
        self._redo_at: float | None = None  # when to read this consumer's pending entries
        self._claim_from = "0-0"  # XAUTOCLAIM's cursor
        self._acking = 0  # XACKs under way
        self._acked = asyncio.Event()  # set while none is
        self._acked.set()

    async def check(self) -> None:
        client = self._new_client(CONNECT_TIMEOUT)
        try:
            await client.ping()
            kind: Any = await client.type(self._stream)
        except RedisError as exc:
            raise TriggerError(
                "url", f"cannot reach Redis at {_address(self._url)}: {exc}; is it running?"
            ) from None
        finally:
            await client.aclose()
        if kind not in (b"stream", b"none"):
            raise TriggerError(
                "stream", f"key {self._stream!r} holds a {kind.decode()}, not a stream"
            )

    async def start(self) -> None:
        self._task = reading(self._events, self._session)

    async def stop(self) -> None:
        await stopped(self._task)
        self._task = None

    async def ack(self, message: Message) -> None:
        entry = _entry(message)
        self._held.discard(entry)
        client = self._client
        if client is None:
            return  # pending: read again by the next session
        self._acking += 1
        self._acked.clear()
        try:
            await client.xack(self._stream, self._group, entry)
        except RedisError as exc:
            log.warning("XACK %s %s failed (it will come again): %s", self._stream, entry, exc)
        finally:
            self._acking -= 1
            if not self._acking:
                self._acked.set()

    async def nack(self, message: Message) -> None:
        self._held.discard(_entry(message))
        at = asyncio.get_running_loop().time() + NACK_PAUSE
        self._redo_at = at if self._redo_at is None else min(self._redo_at, at)

    async def _session(self) -> None:
        client = self._new_client()
        keeper: asyncio.Task[None] | None = None
        try:
            try:
                await client.xgroup_create(
                    self._stream, self._group, id=self._config["start"], mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._client, self._redo_at = client, 0.0
            self._events.connected()
            keeper = asyncio.create_task(self._keep(client))
            await self._read(client)
        finally:
            self._client = None
            try:
                if keeper is not None:
                    keeper.cancel()
                    await asyncio.wait({keeper})
                # XACKs under way would otherwise open connections in the closed pool
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._acked.wait(), SOCKET_TIMEOUT)
            finally:
                await client.aclose()

    async def _read(self, client: aioredis.Redis) -> None:
        loop = asyncio.get_running_loop()
        claim_at = loop.time() + TICK
        while True:
            _stop_if_cancelled()
            if self._redo_at is not None and loop.time() >= self._redo_at:
                await self._read_pending(client)
            if loop.time() >= claim_at:
                await self._take_over(client)
                claim_at = loop.time() + TICK
            count = await self._room()
            reply: Any = await client.xreadgroup(
                self._group, self._consumer, {self._stream: ">"}, count, BLOCK_MS
            )
            for entry, fields in _entries(reply):
                await self._hand(client, entry, fields)

    async def _read_pending(self, client: aioredis.Redis) -> None:
        """This consumer's own pending entries, oldest first (those held are skipped)."""
        self._redo_at = None
        last = b"0"
        while True:
            _stop_if_cancelled()
            count = await self._room() + len(self._held)
            reply: Any = await client.xreadgroup(
                self._group, self._consumer, {self._stream: last}, count
            )
            entries = _entries(reply)
            if not entries:
                return
            for entry, fields in entries:
                await self._hand(client, entry, fields)
                last = entry

    async def _take_over(self, client: aioredis.Redis) -> None:
        """Entries other consumers left pending for claim_after seconds."""
        reply: Any = await client.xautoclaim(
            self._stream,
            self._group,
            self._consumer,
            self._claim_ms,
            self._claim_from,
            count=await self._room(),
        )
        self._claim_from = reply[0].decode()
        for entry, fields in reply[1]:
            if entry is not None:  # None: deleted from the stream (Redis 6.2)
                await self._hand(client, entry, fields)

    async def _hand(self, client: aioredis.Redis, entry_id: bytes, fields: Fields | None) -> None:
        entry = entry_id.decode()
        if entry in self._held:
            return  # the trigger has it already
        if not fields:  # deleted or trimmed from the stream while pending: nothing to deliver
            await client.xack(self._stream, self._group, entry)
            return
        self._held.add(entry)
        try:
            await self._events.put(Message(self._event(entry, fields), entry, self._stream))
        except BaseException:
            self._held.discard(entry)
            raise

    async def _keep(self, client: aioredis.Redis) -> None:
        """Every TICK: keep what is held from being taken over; report the backlog."""
        while self._client is client:
            try:
                if self._held:
                    await client.xclaim(
                        self._stream,
                        self._group,
                        self._consumer,
                        self._claim_ms // 2,
                        list(self._held),
                        justid=True,
                    )
                await self._report(client)
            except RedisError as exc:  # the reading fails too, and ends the session
                log.debug("redis trigger %s: %s", self._events.id, exc)
            _stop_if_cancelled()
            await asyncio.sleep(TICK)

    async def _report(self, client: aioredis.Redis) -> None:
        groups = await client.xinfo_groups(self._stream)
        group = next((g for g in groups if g["name"] == self._group.encode()), None)
        if group is None:
            return
        pending: int = group["pending"] + (group.get("lag") or 0)
        oldest: Any = None
        if group["pending"]:
            oldest = (await client.xpending(self._stream, self._group))["min"]
        else:  # the first entry not delivered yet, if any
            last = group["last-delivered-id"].decode()
            first: Any = await client.xrange(self._stream, f"({last}", "+", count=1)
            oldest = first[0][0] if first else None
        self._events.backlog(pending, _millis(oldest) / 1000 if oldest else 0.0)

    async def _room(self) -> int:
        """The trigger's room, once it has some (the put after a read must not wait)."""
        while self._events.room <= 0:
            await asyncio.sleep(ROOM_POLL)
            _stop_if_cancelled()
        return self._events.room

    def _new_client(self, timeout: float = SOCKET_TIMEOUT) -> aioredis.Redis:
        return aioredis.from_url(
            self._url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=timeout,  # a server that stopped answering ends the session
            retry=Retry(NoBackoff(), 0),  # keep_connected retries
        )

    def _event(self, entry: str, fields: Fields) -> Event:
        text = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
        plain = {k: v for k, v in text.items() if not k.startswith("ce_")}
        if b"data" in fields:
            data, content_type = fields[b"data"], ""
            extensions = {k: v for k, v in plain.items() if _extension_name(k)}
        else:
            data, content_type = json.dumps(plain).encode(), "application/json"
            extensions = {}
        event = Event(
            id=f"{self._stream}-{entry}",
            source=self._source,
            type=TYPE,
            time=_rfc3339(_millis(entry)),
            subject=self._stream,
            datacontenttype=content_type,
            data=data,
            extensions=extensions,
        )
        cloud = {k[3:]: v for k, v in text.items() if k.startswith("ce_")}
        return _cloudevent(event, cloud) if cloud else event


def _cloudevent(event: Event, cloud: dict[str, str]) -> Event:
    """`event` with the attributes the entry's ce_ fields set (read as a binary-mode CloudEvent
    whose missing attributes are the entry's own); `event` as is if they are malformed."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event.id,
        "ce-source": event.source,
        "ce-type": event.type,
        "ce-time": event.time,
        "ce-subject": event.subject,
    }
    content_type = cloud.pop("datacontenttype", event.datacontenttype)
    headers.update((f"ce-{name.lower()}", value) for name, value in cloud.items())
    fields = [(name.encode(), quote(value, safe=_SAFE).encode()) for name, value in headers.items()]
    if content_type:
        fields.append((b"content-type", content_type.encode()))
    try:
        (read,) = from_http(fields, event.data)
    except ValueError as exc:
        log.warning("a Redis entry is a malformed CloudEvent, taken as plain: %s", exc)
        return event
    read.extensions = {**event.extensions, **read.extensions}
    return read


def _address(url: str) -> str:
    """`redis://host:port/db` without credentials (the events' source), or TriggerError."""
    parts = urlsplit(url)
    db = parts.path.strip("/") or "0"
    try:
        port = parts.port or 6379
    except ValueError:
        raise TriggerError("url", f"has an invalid port: {url!r}") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or not db.isdigit():
        raise TriggerError("url", f"must be redis://host:port/db, not {url!r}")
    return f"{parts.scheme}://{parts.hostname}:{port}/{db}"


def _stop_if_cancelled() -> None:
    """Raise a cancellation redis-py lost: on Python 3.11 its `asyncio.wait_for` around a
    write drops a cancel that arrives as the write completes (CPython gh-86296), and the
    command returns as if nothing happened; `stop` would then wait forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _entries(reply: Any) -> list[tuple[bytes, Fields]]:
    """The entries of an XREADGROUP reply on one stream (RESP2: [[stream, entries]])."""
    return list(reply[0][1]) if reply else []


def _extension_name(name: str) -> bool:
    return name not in RESERVED and _NAME.fullmatch(name) is not None


def _entry(message: Message) -> str:
    if not isinstance(message.token, str):
        raise TypeError(f"not a message of a Redis trigger: {message.token!r}")
    return message.token


def _millis(entry: str | bytes) -> int:
    text = entry.decode() if isinstance(entry, bytes) else entry
    return int(text.partition("-")[0])


def _rfc3339(millis: int) -> str:
    moment = datetime.fromtimestamp(millis / 1000, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
