"""PostgreSQL LISTEN/NOTIFY as an event source, with asyncpg: at most once.

NOTIFY is fire and forget: the server hands a notification to the sessions listening on its
channel when the sending transaction commits, and keeps nothing. What is sent while no session
of this trigger listens (before it starts, while it reconnects, during a redeploy) is lost, and
there is nothing to acknowledge: `ack` and `nack` do nothing. For at-least-once delivery, keep
the events in a table or use a broker that stores them.

Each session is one connection that LISTENs on the channel (asyncpg quotes the name, so it is
matched exactly, case included: `NOTIFY Orders` notifies `orders`; `pg_notify('Orders', ...)`
or `NOTIFY "Orders"` notifies `Orders`). A closed connection is seen by asyncpg's termination
listener; a silent one by a `SELECT 1` every PING_EVERY seconds. Then `keep_connected`
reports the trigger failing and connects again.

Back-pressure: NOTIFY has no flow control. asyncpg reads notifications as they come and calls
back, and the callback puts them into a bounded handoff (`handoff_size`) that the session empties
into the trigger at the trigger's pace. When the handoff is full, newer notifications are
dropped, counted (`dropped`) and logged. Not reading the socket instead would not slow the
senders: the server would hold the notifications in its NOTIFY queue (8 GB, shared by the whole
cluster), and once that is full every NOTIFY in every database fails. What waits in the handoff
is reported as the backlog around each hand-over; what is in it when the trigger stops is lost.

Events: id a random UUID (nothing is redelivered, so no id needs to survive a redelivery),
source `postgresql://host:port/database/channel`, subject the channel, data the payload
(`application/json` when it parses as JSON, else `text/plain`), time when it was received, and
the extension `pgpid`: the process id of the server backend that sent it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, urlsplit

import asyncpg  # type: ignore[import-untyped]

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
from ember.triggers.envelope import now

log = logging.getLogger("ember.triggers.postgres")

KEYS = ("url", "channel")
TYPE = "io.ember.postgres.notification"
CONNECT_TIMEOUT = 3.0  # s to connect and log in
CLOSE_TIMEOUT = 2.0  # s for a graceful close before the connection is dropped
PING_EVERY, PING_TIMEOUT = 15.0, 10.0  # s: a server that does not answer is taken for gone
HANDOFF = 10_000  # notifications read and not yet handed to the trigger; more are dropped
WARN_EVERY = 10.0  # s between warnings about dropped notifications
NAMEDATALEN = 63  # the longest identifier PostgreSQL keeps, in bytes (longer is truncated)


class Postgres:
    type: ClassVar[str] = "postgres"
    durable: ClassVar[bool] = False
    handoff_size = HANDOFF
    retry_max = BACKOFF_MAX  # the longest wait between reconnects (tests shorten it)

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        only(config, KEYS)
        url = text_field(config, "url")
        _address(url)
        channel = text_field(config, "channel")
        if len(channel.encode()) > NAMEDATALEN or "\0" in channel:
            raise TriggerError(
                "channel", f"must be at most {NAMEDATALEN} bytes, without NUL: {channel!r}"
            )
        return {"url": url, "channel": channel}

    def __init__(self, config: dict[str, Any], events: Events) -> None:
        self._config = config
        self._events = events
        self._where, database = _address(config["url"])
        self._channel: str = config["channel"]
        self._source = f"{self._where}/{database}/{quote(self._channel, safe='')}"
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # notifications dropped because the handoff was full
        self._warned = 0.0

    async def check(self) -> None:
        """Connect and log in once."""
        connection = await self._connect()
        await _close(connection)

    async def start(self) -> None:
        self._task = reading(self._events, self._session, self.retry_max)

    async def stop(self) -> None:
        await stopped(self._task)
        self._task = None

    async def ack(self, message: Message) -> None:
        """Nothing to do: NOTIFY keeps nothing."""

    async def nack(self, message: Message) -> None:
        """Nothing to do: NOTIFY cannot send again."""

    async def _connect(self) -> asyncpg.Connection:
        try:
            connection: asyncpg.Connection = await asyncpg.connect(
                self._config["url"], timeout=CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise TriggerError(
                "url",
                f"cannot reach PostgreSQL at {self._where}: {describe(exc)}; is the server "
                "running, and are the user, password and database right?",
            ) from None
        return connection

    async def _session(self) -> None:
        connection = await self._connect()
        handoff: asyncio.Queue[Event | None] = asyncio.Queue()  # None: the connection closed

        def notified(_connection: object, pid: int, _channel: str, payload: str) -> None:
            if handoff.qsize() >= self.handoff_size:
                self._drop()
            else:
                handoff.put_nowait(self._event(pid, payload))

        connection.add_termination_listener(lambda _connection: handoff.put_nowait(None))
        pinger = asyncio.create_task(_ping(connection))
        try:
            await connection.add_listener(self._channel, notified)
            self._events.connected()
            while (event := await handoff.get()) is not None:
                self._events.backlog(handoff.qsize() + 1)  # with the one being handed over
                await self._events.put(Message(event, None, self._channel))
                self._events.backlog(handoff.qsize())
        finally:
            pinger.cancel()
            await asyncio.wait({pinger})
            await _close(connection)
        raise ConnectionError(f"lost the connection to PostgreSQL at {self._where}")

    def _event(self, pid: int, payload: str) -> Event:
        try:
            json.loads(payload)
            ctype = "application/json"
        except ValueError:
            ctype = "text/plain"
        return Event(
            id=str(uuid.uuid4()),
            source=self._source,
            type=TYPE,
            time=now(),
            subject=self._channel,
            datacontenttype=ctype,
            data=payload.encode(),
            extensions={"pgpid": str(pid)},
        )

    def _drop(self) -> None:
        self.dropped += 1
        moment = time.monotonic()
        if moment - self._warned >= WARN_EVERY:
            self._warned = moment
            log.warning(
                "trigger %s of %s: the function is slower than the notifications on channel %r; "
                "%d dropped so far (PostgreSQL NOTIFY cannot be slowed down)",
                self._events.name,
                self._events.function,
                self._channel,
                self.dropped,
            )


async def _ping(connection: asyncpg.Connection) -> None:
    """Drop the connection (its termination listener ends the session) when the server stops
    answering."""
    while True:
        await asyncio.sleep(PING_EVERY)
        try:
            await connection.execute("SELECT 1", timeout=PING_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            connection.terminate()
            return


async def _close(connection: asyncpg.Connection) -> None:
    try:
        await connection.close(timeout=CLOSE_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        connection.terminate()


def _address(url: str) -> tuple[str, str]:
    """`postgresql://host:port` (no credentials) and the database's name."""
    parts = urlsplit(url)
    try:
        port = parts.port or 5432
    except ValueError:
        raise TriggerError("url", "has an invalid port (one host:port only)") from None
    if parts.scheme not in ("postgresql", "postgres"):
        shown = parts._replace(netloc=parts.hostname or "").geturl()
        raise TriggerError(
            "url", f"must be postgresql://user:password@host:port/database, not {shown!r}"
        )
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", ["localhost"])[0]
    if "/" in host:  # a unix socket's directory
        host = quote(host, safe="")
    elif ":" in host:
        host = f"[{host}]"
    database = parts.path.strip("/") or parts.username or "postgres"
    return f"postgresql://{host}:{port}", database
