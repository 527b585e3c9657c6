"""An Ember trigger type in one module: each line a client sends over TCP is one event.

This is the example connector (README.md next to it). Copy it to write your own: a trigger
type is a class that meets `ember.triggers.base.Source`, registered under the `ember.triggers`
entry-point group with its type as the entry's name (pyproject.toml). It imports nothing from
Ember but `ember.triggers.base`, the connector SDK.

    triggers:
      - type: tcp
        listen: 127.0.0.1:7001  # host:port, required
        public: false           # true to listen on an address other machines reach
        max_line: 65536         # bytes a line may hold, its newline not counted
        connections: 64         # senders connected at once; more are answered `error busy`
        content_type: text/plain  # the events' datacontenttype

What a sender sees (the sender is the broker here: it keeps a line until Ember has it):
- It connects and writes lines ending in "\\n" ("\\r\\n" too). Each line is one event whose
  data is the line without its line end. Empty lines are skipped.
- The event's id is `<peer>-<n>`, n the line's number in the connection (from 1). A line that
  starts with `id=<x> ` gives its own id instead (1 to 128 printable ASCII characters, the
  rest of the line is the data): a sender that resends after a failure keeps the id, so the
  function can drop duplicates.
- Once Ember has the event (the function succeeded, or the event is stored in the durable
  async queue) the source answers `ok <id>\\n` on the connection; `retry <id>\\n` when Ember
  could do neither. Answers come as events are settled, not in line order. A line without
  `ok` when the connection ends must be sent again (at least once).
- `error <why>\\n` answers a line that is not taken (a bad `id=`, a last line with no
  newline); after a line longer than `max_line`, or when too many senders are connected, the
  connection is closed.
- After the sender closes its side (`nc -N`, `shutdown(SHUT_WR)`), the source answers what it
  read, then closes.

Back-pressure: a connection's next line is read only once `Events.put` returned for the one
before, and `put` waits while the trigger holds as many events as its `delivery.concurrency`.
Unread bytes stay in the socket buffers, so TCP flow control makes a fast sender wait for a
slow function. Answers the sender does not read stop the reading too (`drain`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from ember.triggers.base import (
    Event,
    Events,
    Message,
    TriggerError,
    int_field,
    keep_connected,
    only,
    text_field,
)

EVENT_TYPE = "io.ember.tcp.line"
KEYS = ("listen", "public", "max_line", "connections", "content_type")
_GIVEN_ID = re.compile(rb"[!-~]{1,128}")  # printable ASCII, no space

# Ports the tcp triggers of this process listen on: `check` runs at every deploy, also while
# the trigger it checks is running and holding its port (see `check`).
_listening: set[int] = set()


class TcpLines:
    """Lines over TCP as events; the `ok` answer is the acknowledgement."""

    type: ClassVar[str] = "tcp"
    # Nothing is lost across a restart: what was not answered `ok` is the sender's to resend.
    durable: ClassVar[bool] = True

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The trigger's settings with defaults; no I/O (Ember calls it at every deploy)."""
        only(config, KEYS)
        listen = text_field(config, "listen")
        host, _ = _address(listen)
        public = config.get("public", False)
        if not isinstance(public, bool):
            raise TriggerError("public", f"must be true or false, not {public!r}")
        if not public and not _loopback(host):
            raise TriggerError(
                "listen",
                f"{host} may be reached from other machines, and whoever reaches it sends events "
                "to the function: listen on 127.0.0.1, localhost or [::1], or set `public: true`",
            )
        return {
            "listen": listen,
            "public": public,
            "max_line": int_field(config, "max_line", 65536, 1, 16 * 2**20),
            "connections": int_field(config, "connections", 64, 1, 10000),
            "content_type": text_field(config, "content_type", "text/plain"),
        }

    def __init__(self, config: dict[str, Any], events: Events) -> None:
        """`config` is what `validate` returned; `events` is the trigger."""
        self._events = events
        self._listen: str = config["listen"]
        self._host, self._port = _address(self._listen)
        self._max_line: int = config["max_line"]
        self._most: int = config["connections"]
        self._content_type: str = config["content_type"]
        self._source = f"tcp://{self._listen}"
        self._task: asyncio.Task[None] | None = None
        self._readers: set[asyncio.Task[None]] = set()  # one per connected sender

    async def check(self) -> None:
        """At deploy: can the address be listened on? (bind, then close at once)"""
        if self._port in _listening:
            # Held by a running tcp trigger of this server: most likely the one checked (a
            # redeploy). If it is another function's, the new trigger shows `failing`.
            return
        try:
            server = await asyncio.start_server(
                _closed, self._host, self._port, start_serving=False
            )
        except OSError as exc:
            raise TriggerError(
                "listen",
                f"cannot listen on {self._listen}: {exc.strerror or exc}; is another program "
                "using the port? Choose another one",
            ) from None
        server.close()
        await server.wait_closed()

    async def start(self) -> None:
        """Listen in a task of our own; `keep_connected` listens again after a failure (the
        port taken by another program, say) and reports it with `events.failing`."""
        self._task = asyncio.create_task(keep_connected(self._events, self._session))

    async def stop(self) -> None:
        """Stop listening and close every connection: lines not answered `ok` are resent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def ack(self, message: Message) -> None:
        _connection(message).settle(f"ok {message.event.id}")

    async def nack(self, message: Message) -> None:
        _connection(message).settle(f"retry {message.event.id}")

    async def _session(self) -> None:
        """One listening session: returns only by raising (or being cancelled by `stop`)."""
        server = await asyncio.start_server(
            self._accept, self._host, self._port, limit=self._max_line
        )
        _listening.add(self._port)
        try:
            self._events.connected()
            await server.serve_forever()
        finally:
            _listening.discard(self._port)
            server.close()
            for reader in self._readers:
                reader.cancel()
            if self._readers:
                await asyncio.wait(self._readers)
            await server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A sender connected: serve it in a task `stop` can cancel (it may wait in `put`)."""
        connection = _Connection(_peer(writer.get_extra_info("peername")), writer)
        if len(self._readers) >= self._most:
            connection.reply(f"error busy: {self._most} senders are connected; retry later")
            writer.close()
            return
        task = asyncio.create_task(self._serve(reader, connection))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _serve(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        """One sender, from connect to close."""
        try:
            await self._read(reader, connection)
            await connection.idle.wait()  # answer what was read before closing
        except OSError:  # the sender went away: it resends what it got no `ok` for
            pass
        finally:
            connection.writer.close()

    async def _read(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        """Hand each line over, reading the next one only once `put` returned."""
        number = 0
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as end:  # the sender closed its side
                if end.partial:
                    connection.reply("error the last line has no newline: it was not taken")
                return
            except asyncio.LimitOverrunError:
                connection.reply(f"error a line is longer than max_line ({self._max_line} bytes)")
                return
            number += 1
            line = line[:-1].removesuffix(b"\r")
            if not line:
                continue
            event = self._event(connection, number, line)
            if event is None:
                continue
            connection.handed()
            await self._events.put(Message(event, connection, connection.peer))
            await connection.writer.drain()  # the sender does not read its answers: wait

    def _event(self, connection: _Connection, number: int, line: bytes) -> Event | None:
        id = f"{connection.peer}-{number}"
        if line.startswith(b"id="):
            given, _, line = line[3:].partition(b" ")
            if not _GIVEN_ID.fullmatch(given):
                connection.reply(
                    f"error line {number}: id= takes 1 to 128 printable ASCII characters and "
                    "a space before the data; the line was not taken"
                )
                return None
            id = given.decode("ascii")
        return Event(
            id=id,
            source=self._source,
            type=EVENT_TYPE,
            time=_now(),
            subject=connection.peer,  # where it came from; also the ordering key
            datacontenttype=self._content_type,
            data=line,
        )


class _Connection:
    """A sender's connection as the `token` of its messages: where their answers go."""

    __slots__ = ("idle", "peer", "unsettled", "writer")

    def __init__(self, peer: str, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.writer = writer
        self.unsettled = 0  # lines handed over and not yet acked or nacked
        self.idle = asyncio.Event()
        self.idle.set()

    def handed(self) -> None:
        self.unsettled += 1
        self.idle.clear()

    def settle(self, answer: str) -> None:
        self.reply(answer)
        self.unsettled -= 1
        if self.unsettled <= 0:
            self.idle.set()

    def reply(self, text: str) -> None:
        if not self.writer.is_closing():  # else the sender resends the line anyway
            self.writer.write(text.encode() + b"\n")


def _connection(message: Message) -> _Connection:
    if not isinstance(message.token, _Connection):
        raise TypeError(f"not a message of a tcp trigger: {message.token!r}")
    return message.token


def _address(listen: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port`) split; raises TriggerError("listen", ...)."""
    host, colon, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise TriggerError(
            "listen", f"write an IPv6 address in brackets, [::1]:7001, not {listen!r}"
        )
    if (
        not colon
        or not host
        or not (port.isascii() and port.isdigit())
        or not 0 < int(port) < 2**16
    ):
        raise TriggerError(
            "listen",
            f"must be host:port with a port from 1 to 65535, e.g. 127.0.0.1:7001, not {listen!r}",
        )
    return host, int(port)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _peer(name: Any) -> str:
    """The sender's address as text: 127.0.0.1:50412, [::1]:50412."""
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(name)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()  # check() never accepts a connection; this is only what start_server needs
