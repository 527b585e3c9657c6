"""The tcp source against the `Source` protocol, with real sockets on 127.0.0.1 and a recording
`Events` in place of Ember's trigger: settings, events and their attributes, `ok` only at `ack`,
`retry` at `nack`, back-pressure down to the sender, and what `stop` and a taken port do.

Run: `pytest examples/connector-tcp` (Ember's `make test` runs them through
tests/unit/test_connector_example.py).
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
from ember_tcp_source import TcpLines

from ember.triggers.base import Message, TriggerError

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


class Recording:
    """A recording `Events`: like a trigger with `delivery.concurrency: limit`, `put` waits
    while `limit` messages are handed over and not yet settled."""

    def __init__(self, limit: int = 16) -> None:
        self.id, self.function, self.name = "tr-test", "default/fn", "lines"
        self.limit = limit
        self.held = 0
        self.offered = 0  # calls to put, returned or still waiting for room
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.states: list[str] = []
        self.errors: list[str] = []
        self._room = asyncio.Condition()

    @property
    def room(self) -> int:
        return self.limit - self.held

    async def put(self, message: Message) -> None:
        self.offered += 1
        async with self._room:
            await self._room.wait_for(lambda: self.held < self.limit)
            self.held += 1
        self.messages.put_nowait(message)

    async def get(self) -> Message:
        return await asyncio.wait_for(self.messages.get(), 5)

    async def settle(self, source: TcpLines, message: Message, ok: bool = True) -> None:
        """What Ember does once the function answered: ack (or nack), and room for one more."""
        await (source.ack(message) if ok else source.nack(message))
        async with self._room:
            self.held -= 1
            self._room.notify_all()

    def connected(self) -> None:
        self.states.append("running")

    def failing(self, error: str) -> None:
        self.states.append("failing")
        self.errors.append(error)

    def backlog(self, pending: int, oldest: float = 0.0) -> None: ...

    async def load_state(self) -> bytes:
        return b""

    async def save_state(self, state: bytes) -> None: ...


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 20))


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def running(limit: int = 16, **config: Any) -> AsyncIterator[tuple[TcpLines, Recording, int]]:
    """A started source on a free port of 127.0.0.1 (the third value), stopped on exit."""
    events = Recording(limit)
    port = free_port()
    source = TcpLines(TcpLines.validate({"listen": f"127.0.0.1:{port}", **config}), events)
    await source.start()
    try:
        await until(lambda: "running" in events.states, f"listening ({events.errors})")
        yield source, events, port
    finally:
        await source.stop()


@asynccontextmanager
async def sender(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()  # drops what is still buffered (the back-pressure test's)


async def answer(reader: asyncio.StreamReader) -> str:
    return (await asyncio.wait_for(reader.readline(), 5)).decode()


def address(writer: asyncio.StreamWriter) -> str:
    host, local_port = writer.get_extra_info("sockname")[:2]
    return f"{host}:{local_port}"


# ---- settings ----


def test_validate_fills_the_defaults() -> None:
    assert TcpLines.validate({"listen": "127.0.0.1:7001"}) == {
        "listen": "127.0.0.1:7001",
        "public": False,
        "max_line": 65536,
        "connections": 64,
        "content_type": "text/plain",
    }
    for listen in ("localhost:7001", "[::1]:7001", "127.0.0.2:1"):
        assert TcpLines.validate({"listen": listen})["listen"] == listen
    public = TcpLines.validate({"listen": "0.0.0.0:7001", "public": True, "max_line": 10})
    assert (public["public"], public["max_line"]) == (True, 10)


@pytest.mark.parametrize(
    ("config", "field", "words"),
    [
        ({}, "listen", "is required"),
        ({"listen": 7001}, "listen", "non-empty string"),
        ({"listen": "127.0.0.1"}, "listen", "host:port"),
        ({"listen": "127.0.0.1:0"}, "listen", "from 1 to 65535"),
        ({"listen": "127.0.0.1:70000"}, "listen", "from 1 to 65535"),
        ({"listen": ":7001"}, "listen", "host:port"),
        ({"listen": "::1:7001"}, "listen", "in brackets"),
        ({"listen": "0.0.0.0:7001"}, "listen", "public: true"),
        ({"listen": "example.com:7001"}, "listen", "public: true"),
        ({"listen": "127.0.0.1:7001", "public": "yes"}, "public", "true or false"),
        ({"listen": "127.0.0.1:7001", "max_line": 0}, "max_line", "from 1 to"),
        ({"listen": "127.0.0.1:7001", "connections": True}, "connections", "whole number"),
        ({"listen": "127.0.0.1:7001", "lisen": "x"}, "lisen", "known: listen"),
    ],
)
def test_validate_names_the_key_at_fault(config: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(TriggerError) as caught:
        TcpLines.validate(config)
    assert caught.value.field == field and words in caught.value.problem


def test_check_binds_the_address_and_names_listen_when_it_is_taken() -> None:
    async def main() -> None:
        listen = f"127.0.0.1:{free_port()}"
        await TcpLines(TcpLines.validate({"listen": listen}), Recording()).check()
        with socket.create_server(("127.0.0.1", 0)) as taken:
            busy = f"127.0.0.1:{taken.getsockname()[1]}"
            source = TcpLines(TcpLines.validate({"listen": busy}), Recording())
            with pytest.raises(TriggerError) as caught:
                await source.check()
        assert caught.value.field == "listen" and "in use" in caught.value.problem
        # A trigger already listening there (the same trigger, deployed again) passes
        async with running() as (_, _, port):
            again = {"listen": f"127.0.0.1:{port}"}
            await TcpLines(TcpLines.validate(again), Recording()).check()

    run(main)


# ---- events, ok and retry ----


def test_each_line_is_an_event_with_its_attributes() -> None:
    async def main() -> None:
        async with running() as (source, events, port), sender(port) as (_, writer):
            writer.write(b'hello\r\n\nid=order-7 {"n": 7}\nbye\n')
            first, second, third = [await events.get() for _ in range(3)]
            peer = address(writer)
            assert [m.event.id for m in (first, second, third)] == [
                f"{peer}-1",
                "order-7",
                f"{peer}-4",  # the empty line 2 is skipped, but counted
            ]
            assert [m.event.data for m in (first, second, third)] == [b"hello", b'{"n": 7}', b"bye"]
            event = first.event
            assert event.source == f"tcp://127.0.0.1:{port}"
            assert (event.type, event.subject, first.key) == ("io.ember.tcp.line", peer, peer)
            assert event.datacontenttype == "text/plain" and RFC3339.match(event.time)
            for message in (first, second, third):
                await events.settle(source, message)

    run(main)


def test_ok_is_answered_only_at_ack_and_retry_at_nack() -> None:
    async def main() -> None:
        async with running() as (source, events, port), sender(port) as (reader, writer):
            writer.write(b"one\ntwo\n")
            one, two = await events.get(), await events.get()
            await events.settle(source, two)
            # the first answer on the connection is two's: nothing was said of one at receipt
            assert await answer(reader) == f"ok {two.event.id}\n"
            await events.settle(source, one, ok=False)
            assert await answer(reader) == f"retry {one.event.id}\n"
            writer.write(b"id=one again\n")  # the sender resends, with an id of its own
            resent = await events.get()
            assert (resent.event.id, resent.event.data) == ("one", b"again")
            await events.settle(source, resent)
            assert await answer(reader) == "ok one\n"

    run(main)


def test_a_sender_that_closes_its_side_gets_its_answers_then_the_connection_closes() -> None:
    """What `printf 'hello\\n' | nc -N 127.0.0.1 7001` sees."""

    async def main() -> None:
        async with running() as (source, events, port), sender(port) as (reader, writer):
            writer.write(b"hello\n")
            writer.write_eof()
            message = await events.get()
            await events.settle(source, message)
            assert await answer(reader) == f"ok {message.event.id}\n"
            assert await answer(reader) == ""  # closed by the source

    run(main)


def test_lines_that_are_not_taken_are_answered_error() -> None:
    async def main() -> None:
        async with running(max_line=16) as (source, events, port):
            async with sender(port) as (reader, writer):
                writer.write(b"id= no id\nid=\xff x\nfine\n")
                assert (await answer(reader)).startswith("error line 1: id= takes")
                assert (await answer(reader)).startswith("error line 2: id= takes")
                fine = await events.get()
                assert fine.event.id.endswith("-3") and fine.event.data == b"fine"
                await events.settle(source, fine)
                assert await answer(reader) == f"ok {fine.event.id}\n"
                writer.write(b"x" * 17 + b"\n")
                assert await answer(reader) == "error a line is longer than max_line (16 bytes)\n"
                assert await answer(reader) == ""  # and the connection is closed
            async with sender(port) as (reader, writer):
                writer.write(b"unfinished")
                writer.write_eof()
                assert (await answer(reader)).startswith("error the last line has no newline")
                assert await answer(reader) == ""
            assert events.offered == 1

    run(main)


def test_senders_beyond_connections_are_answered_busy() -> None:
    async def main() -> None:
        async with running(connections=1) as (source, events, port), sender(port) as (_, first):
            first.write(b"a\n")
            message = await events.get()  # the first sender is being served
            async with sender(port) as (reader, _):
                assert (await answer(reader)).startswith("error busy: 1 senders are connected")
                assert await answer(reader) == ""
            await events.settle(source, message)

    run(main)


# ---- back-pressure ----


def test_a_full_trigger_stops_the_reading_and_tcp_holds_the_sender() -> None:
    async def main() -> None:
        async with (
            running(limit=1, max_line=2048) as (source, events, port),
            sender(port) as (reader, writer),
        ):
            writer.write(b"first\nsecond\nthird\n")
            first = await events.get()
            # "second" is read and waits in put for room; nothing after it is read
            await until(lambda: events.offered == 2, "the second line offered")
            writer.write((b"x" * 1000 + b"\n") * 32_000)  # 32 MB: more than socket buffers
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(writer.drain(), 1)  # the sender cannot send it all
            assert events.offered == 2 and events.messages.empty()
            await events.settle(source, first)
            second = await events.get()  # room again: the next line is handed over
            assert second.event.data == b"second"
            assert await answer(reader) == f"ok {first.event.id}\n"
            await until(lambda: events.offered == 3, "the third line offered")

    run(main)


# ---- stop, restart, a taken port ----


def test_stop_closes_the_connections_and_frees_the_port() -> None:
    async def main() -> None:
        events = Recording()
        port = free_port()
        listen = f"127.0.0.1:{port}"
        source = TcpLines(TcpLines.validate({"listen": listen}), events)
        await source.start()
        await until(lambda: "running" in events.states, "listening")
        async with sender(port) as (reader, writer):
            writer.write(b"unacked\n")
            message = await events.get()
            await source.stop()
            assert await answer(reader) == ""  # closed with no `ok`: the sender resends it
            await source.ack(message)  # too late: nothing to answer on, and no error
        again = TcpLines(TcpLines.validate({"listen": listen}), Recording())
        await again.check()  # the port is free
        await source.start()  # and the same source starts again on it
        await until(lambda: events.states.count("running") == 2, "listening again")
        async with sender(port) as (reader, writer):
            writer.write(b"unacked\n")
            resent = await events.get()
            assert resent.event.data == b"unacked"
            await source.ack(resent)
            assert await answer(reader) == f"ok {resent.event.id}\n"
        await source.stop()

    run(main)


def test_a_taken_port_makes_the_trigger_fail_until_it_is_free() -> None:
    async def main() -> None:
        taken = socket.create_server(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        listen = f"127.0.0.1:{port}"
        events = Recording()
        source = TcpLines(TcpLines.validate({"listen": listen}), events)
        try:
            await source.start()
            await until(lambda: "failing" in events.states, "the trigger failing")
            assert "OSError" in events.errors[0] and "in use" in events.errors[0]
            taken.close()
            await until(lambda: events.states[-1] == "running", "listening once free")
            async with sender(port) as (_, writer):
                writer.write(b"now\n")
                assert (await events.get()).event.data == b"now"
        finally:
            taken.close()
            await source.stop()

    run(main)
