"""The Redis Streams source against a real redis-server: configuration, attributes, XACK at
`ack` (what is not acked comes again, also after a nack), back-pressure (nothing is delivered
to the consumer beyond the trigger's room), takeover of a dead consumer's entries, and
reconnection after the server is killed."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from ember.triggers.base import Message, TriggerError
from ember.triggers.sources import redis as redis_source
from ember.triggers.sources.redis import RedisStreams
from tests.brokers.redis import RedisServer
from tests.brokers.sink import Sink


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as started:
        yield started


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backlog reports, idle-time resets and takeovers every 0.1 s instead of 5."""
    monkeypatch.setattr(redis_source, "TICK", 0.1)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 10.0, why: object = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met in time {why}"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def redis_client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def running(
    server: RedisServer, sink: Sink, stream: str, **config: Any
) -> AsyncIterator[RedisStreams]:
    source = RedisStreams(
        RedisStreams.validate({"url": server.url, "stream": stream, **config}), sink
    )
    await source.start()
    try:
        await until(lambda: "running" in sink.states, why=sink.errors)
        yield source
    finally:
        await source.stop()


async def take(sink: Sink, source: RedisStreams, ack: bool = True) -> Message:
    message = await sink.get()
    if ack:
        await source.ack(message)
    await sink.done()
    return message


def text(entry: bytes | str) -> str:
    return entry.decode() if isinstance(entry, bytes) else entry


async def pending(client: aioredis.Redis, stream: str) -> int:
    summary: Any = await client.xpending(stream, "ember")
    count: int = summary["pending"]
    return count


# --- configuration -------------------------------------------------------------------------


def test_validate_fills_defaults() -> None:
    config = RedisStreams.validate({"url": "redis://cache:6379/2", "stream": "orders"})
    assert config == {
        "url": "redis://cache:6379/2",
        "stream": "orders",
        "group": "ember",
        "consumer": "",
        "start": "$",
        "claim_after": 60,
    }
    given = {"url": "redis://:secret@cache", "stream": "s", "start": 0, "claim_after": 5}
    assert RedisStreams.validate(given)["start"] == "0"


@pytest.mark.parametrize(
    ("config", "field", "words"),
    [
        ({"stream": "s"}, "url", "required"),
        ({"url": "http://cache:6379", "stream": "s"}, "url", "redis://host:port/db"),
        ({"url": "redis://cache:6379/x", "stream": "s"}, "url", "redis://host:port/db"),
        ({"url": "redis://cache:70000", "stream": "s"}, "url", "port"),
        ({"url": "redis://cache"}, "stream", "required"),
        ({"url": "redis://cache", "stream": "s", "group": ""}, "group", "empty"),
        ({"url": "redis://cache", "stream": "s", "start": ">"}, "start", '"$"'),
        ({"url": "redis://cache", "stream": "s", "claim_after": 0}, "claim_after", "from 1"),
        ({"url": "redis://cache", "stream": "s", "count": 5}, "count", "not a setting"),
    ],
)
def test_validate_names_the_key_at_fault(config: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(TriggerError) as caught:
        RedisStreams.validate(config)
    assert caught.value.field == field
    assert words in caught.value.problem


def test_check_gives_up_in_about_3_s_when_nothing_answers() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # connections are accepted, never answered
        port = sock.getsockname()[1]
        config = RedisStreams.validate({"url": f"redis://127.0.0.1:{port}/0", "stream": "s"})

        async def main() -> None:
            began = time.monotonic()
            with pytest.raises(TriggerError) as caught:
                await RedisStreams(config, Sink()).check()
            assert (caught.value.field, "is it running?" in caught.value.problem) == ("url", True)
            assert time.monotonic() - began < 4

        run(main)


def test_check_names_the_url_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        config = RedisStreams.validate({"url": f"redis://127.0.0.1:{port}/0", "stream": "s"})

        async def main() -> None:
            with pytest.raises(TriggerError) as caught:
                await RedisStreams(config, Sink()).check()
            assert caught.value.field == "url"
            assert "is it running?" in caught.value.problem

        run(main)


def test_check_names_the_stream_when_the_key_is_no_stream(server: RedisServer) -> None:
    async def main() -> None:
        async with redis_client(server) as client:
            await client.set("not-a-stream", "x")
        await RedisStreams(
            RedisStreams.validate({"url": server.url, "stream": "new"}), Sink()
        ).check()
        config = RedisStreams.validate({"url": server.url, "stream": "not-a-stream"})
        with pytest.raises(TriggerError) as caught:
            await RedisStreams(config, Sink()).check()
        assert (caught.value.field, "holds a string" in caught.value.problem) == ("stream", True)

    run(main)


# --- entries -------------------------------------------------------------------------------


def test_entries_arrive_with_their_attributes(server: RedisServer) -> None:
    async def main() -> None:
        sink = Sink(id="attributes")
        async with running(server, sink, "attrs") as source, redis_client(server) as client:
            first_id = await client.xadd("attrs", {"data": b"\x00raw", "tenant": "a", "Bad": "x"})
            second_id = await client.xadd("attrs", {"user": "ann", "n": "1"})
            cloud: dict[Any, Any] = {
                "data": "{}",
                "ce_id": "e-1",
                "ce_type": "shop.order",
                "ce_source": "/shop",
            }
            cloud |= {"ce_datacontenttype": "application/json", "ce_trace": "t1"}
            third_id = await client.xadd("attrs", cloud)
            fourth_id = await client.xadd("attrs", {"data": "x", "ce_time": "yesterday"})
            first, second, third, fourth = [await take(sink, source) for _ in range(4)]
            assert await pending(client, "attrs") == 0
        entry = text(first_id)
        event = first.event
        assert (event.id, event.subject, first.key) == (f"attrs-{entry}", "attrs", "attrs")
        assert event.source == f"redis://127.0.0.1:{server.port}/0/attrs"
        assert event.type == "io.ember.redis.message"
        millis = int(entry.split("-")[0])
        assert datetime.fromisoformat(event.time) == datetime.fromtimestamp(millis / 1000, UTC)
        assert (event.data, event.datacontenttype, event.extensions) == (
            b"\x00raw",
            "",
            {"tenant": "a"},
        )
        assert second.event.id == f"attrs-{text(second_id)}"
        assert json.loads(second.event.data) == {"user": "ann", "n": "1"}
        assert second.event.datacontenttype == "application/json"
        cloud_event = third.event
        assert (cloud_event.id, cloud_event.type, cloud_event.source) == (
            "e-1",
            "shop.order",
            "/shop",
        )
        assert (cloud_event.datacontenttype, cloud_event.data) == ("application/json", b"{}")
        assert cloud_event.extensions == {"trace": "t1"}
        millis = int(text(third_id).split("-")[0])  # what the entry did not set is its own
        assert datetime.fromisoformat(cloud_event.time) == datetime.fromtimestamp(
            millis / 1000, UTC
        )
        assert cloud_event.subject == "attrs"
        malformed = fourth.event  # a ce_time that is no time: the entry is taken as plain
        assert (malformed.id, malformed.type) == (
            f"attrs-{text(fourth_id)}",
            "io.ember.redis.message",
        )
        assert (malformed.data, malformed.extensions) == (b"x", {})

    run(main)


def test_what_is_not_acked_comes_again_to_the_next_session(server: RedisServer) -> None:
    async def main() -> None:
        async with redis_client(server) as client:
            async with running(server, Sink(id="again"), "again") as source:
                sink = source._events
                assert isinstance(sink, Sink)
                await client.xadd("again", {"data": "acked"})
                await client.xadd("again", {"data": "not acked"})
                await take(sink, source)
                unacked = await take(sink, source, ack=False)
            sink = Sink(id="again")  # the same trigger: the same consumer
            async with running(server, sink, "again") as source:
                await client.xadd("again", {"data": "new"})
                again, new = await take(sink, source), await take(sink, source)
                assert await pending(client, "again") == 0
        assert (again.event.data, new.event.data) == (b"not acked", b"new")  # "acked" not again
        assert again.event.id == unacked.event.id

    run(main)


def test_a_nack_has_it_read_again(server: RedisServer) -> None:
    async def main() -> None:
        sink = Sink(id="nack")
        async with running(server, sink, "nack") as source, redis_client(server) as client:
            await client.xadd("nack", {"data": "one"})
            await client.xadd("nack", {"data": "two"})
            one = await sink.get()
            await source.nack(one)
            await sink.done()
            two = await take(sink, source)
            again = await take(sink, source)
            assert await pending(client, "nack") == 0
        assert [m.event.data for m in (one, two, again)] == [b"one", b"two", b"one"]
        assert again.event.id == one.event.id

    run(main)


def test_back_pressure_the_server_keeps_what_the_trigger_has_no_room_for(
    server: RedisServer, quick: None
) -> None:
    async def main() -> None:
        sink = Sink(limit=2, id="pressure")
        async with running(server, sink, "pressure") as source, redis_client(server) as client:
            for i in range(5):
                await client.xadd("pressure", {"data": str(i)})
            info: Any = await client.info("server")
            # the backlog: the 2 delivered, and from Redis 7 on (which reports a group's lag)
            # the 3 not delivered yet
            backlog = 2 if int(info["redis_version"].split(".")[0]) < 7 else 5
            await until(lambda: sink.held == 2 and sink.pending == backlog)
            await asyncio.sleep(0.3)  # an absence: give a wrong third read time to show
            assert (sink.held, await pending(client, "pressure")) == (2, 2)
            taken = [await take(sink, source)]
            await until(lambda: sink.messages.qsize() == 2)
            assert await pending(client, "pressure") == 2  # one acked, one more delivered
            taken += [await take(sink, source) for _ in range(4)]
            assert await pending(client, "pressure") == 0
        assert [m.event.data for m in taken] == [b"0", b"1", b"2", b"3", b"4"]

    run(main)


def test_a_dead_consumers_entries_are_taken_over(server: RedisServer, quick: None) -> None:
    async def main() -> None:
        sink = Sink(id="takeover")
        async with redis_client(server) as client:
            await client.xgroup_create("takeover", "ember", id="$", mkstream=True)
            await client.xadd("takeover", {"data": "orphan"})
            await client.xreadgroup("ember", "dead", {"takeover": ">"})  # and never acks it
            read = time.monotonic()
            async with running(server, sink, "takeover", claim_after=1) as source:
                orphan = await take(sink, source)
                assert time.monotonic() - read >= 1.0  # once it was pending for claim_after
                assert await pending(client, "takeover") == 0
        assert orphan.event.data == b"orphan"

    run(main)


def test_what_a_full_trigger_holds_is_not_taken_over(server: RedisServer, quick: None) -> None:
    async def main() -> None:
        sink = Sink(limit=1, id="keep")
        keep = running(server, sink, "keep", claim_after=1)
        async with redis_client(server) as client, keep as source:
            await client.xadd("keep", {"data": "held"})
            held = await sink.get()  # the trigger is full: the source reads nothing more
            deadline = time.monotonic() + 1.5  # by then "held" would be idle for 1 s
            while time.monotonic() < deadline:
                thief: Any = await client.xautoclaim("keep", "ember", "thief", 1000)
                assert thief[1] == []
                await asyncio.sleep(0.1)
            await source.ack(held)
            assert await pending(client, "keep") == 0

    run(main)


def test_stop_ends_the_source_when_the_client_loses_the_cancellation(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.11 redis-py's asyncio.wait_for can drop a cancel (CPython gh-86296)."""
    original = aioredis.Redis.xreadgroup

    async def losing(self: aioredis.Redis, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except asyncio.CancelledError:
            return []  # as if the read had completed

    monkeypatch.setattr(aioredis.Redis, "xreadgroup", losing)

    async def main() -> None:
        sink = Sink(id="lost")
        source = RedisStreams(RedisStreams.validate({"url": server.url, "stream": "lost"}), sink)
        await source.start()
        await until(lambda: "running" in sink.states, why=sink.errors)
        await asyncio.wait_for(source.stop(), 5)

    run(main)


def test_reconnects_after_the_server_is_killed(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:

        async def main() -> None:
            sink = Sink(id="reconnect")
            async with running(server, sink, "re") as source:
                async with redis_client(server) as client:
                    await client.xadd("re", {"data": "acked"})
                    await client.xadd("re", {"data": "held"})
                await take(sink, source)
                held = await take(sink, source, ack=False)
                server.kill()
                await until(lambda: "failing" in sink.states)
                server.start()
                await until(lambda: sink.states[-1] == "running")
                async with redis_client(server) as client:
                    await client.xadd("re", {"data": "after"})
                    after = await take(sink, source)  # not "acked" again, nor "held"
                    await source.nack(held)
                    again = await take(sink, source)
                    assert await pending(client, "re") == 0
            assert (after.event.data, again.event.data) == (b"after", b"held")
            assert sink.states[:2] == ["running", "failing"]

        run(main)
