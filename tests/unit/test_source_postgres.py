"""The PostgreSQL LISTEN/NOTIFY source against a real server (tests/brokers/postgres.py, started
once for the module): validation, check, attributes and order, the bounded handoff, reconnects.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from ember.triggers.base import TriggerError
from ember.triggers.sources.postgres import Postgres
from tests.brokers.postgres import Postgres as Server
from tests.brokers.sink import Sink


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server() as running:
        yield running


@pytest.fixture
def channel() -> str:
    return f"Events {uuid.uuid4().hex[:6]}"  # upper case and a space: quoted in LISTEN


def source_for(server: Server, channel: str, sink: Sink) -> Postgres:
    return Postgres(Postgres.validate({"url": server.url, "channel": channel}), sink)


async def notify(url: str, channel: str, *payloads: str) -> int:
    """Send the payloads in one transaction; the sending backend's pid."""
    connection = await asyncpg.connect(url)
    try:
        async with connection.transaction():
            for payload in payloads:
                await connection.execute("SELECT pg_notify($1, $2)", channel, payload)
        pid: int = await connection.fetchval("SELECT pg_backend_pid()")
        return pid
    finally:
        await connection.close()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def running(sink: Sink, times: int = 1) -> None:
    await until(lambda: sink.states.count("running") == times)


# Configuration --------------------------------------------------------------------------------


def test_validate() -> None:
    entry = {"url": "postgresql://u:p@db:5433/app", "channel": "orders"}
    assert Postgres.validate(entry) == entry


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"channel": "c"}, "url"),
        ({"url": "mysql://h/db", "channel": "c"}, "url"),
        ({"url": "postgresql://h:0x1/db", "channel": "c"}, "url"),
        ({"url": "postgresql://h/db"}, "channel"),
        ({"url": "postgresql://h/db", "channel": ""}, "channel"),
        ({"url": "postgresql://h/db", "channel": "c" * 64}, "channel"),
        ({"url": "postgresql://h/db", "channel": "a\0b"}, "channel"),
        ({"url": "postgresql://h/db", "channel": "c", "queue": "q"}, "queue"),
    ],
)
def test_validate_names_the_wrong_key(entry: dict[str, Any], field: str) -> None:
    with pytest.raises(TriggerError) as caught:
        Postgres.validate(entry)
    assert caught.value.field == field


def test_check_fails_on_an_unreachable_server() -> None:
    url = "postgresql://u:s3cret@127.0.0.1:1/app"
    source = Postgres(Postgres.validate({"url": url, "channel": "c"}), Sink())
    with pytest.raises(TriggerError) as caught:
        asyncio.run(source.check())
    assert caught.value.field == "url"
    assert "postgresql://127.0.0.1:1" in caught.value.problem
    assert "s3cret" not in caught.value.problem


def test_check_names_a_missing_database(server: Server) -> None:
    url = server.url.rsplit("/", 1)[0] + "/nosuchdb"
    with pytest.raises(TriggerError) as caught:
        asyncio.run(Postgres(Postgres.validate({"url": url, "channel": "c"}), Sink()).check())
    assert caught.value.field == "url" and "nosuchdb" in caught.value.problem
    asyncio.run(source_for(server, "c", Sink()).check())


# Delivery -------------------------------------------------------------------------------------


def test_notifications_arrive_in_order_with_attributes(server: Server, channel: str) -> None:
    async def main() -> None:
        sink = Sink()
        source = source_for(server, channel, sink)
        await source.start()
        try:
            await running(sink)
            await notify(server.url, channel.lower(), "not ours")  # another channel
            pid = await notify(server.url, channel, '{"order": 7}', "plain text", "")
            messages = [await sink.get() for _ in range(3)]
        finally:
            await source.stop()
        first, second, third = (m.event for m in messages)
        assert (first.data, second.data, third.data) == (b'{"order": 7}', b"plain text", b"")
        assert first.datacontenttype == "application/json"
        assert second.datacontenttype == third.datacontenttype == "text/plain"
        assert len({first.id, second.id, third.id}) == 3 and uuid.UUID(first.id)
        encoded = channel.replace(" ", "%20")
        assert first.source == f"postgresql://127.0.0.1:{server.port}/postgres/{encoded}"
        assert first.type == "io.ember.postgres.notification"
        assert first.subject == channel and messages[0].key == channel
        assert first.extensions == {"pgpid": str(pid)}
        age = datetime.now(UTC) - datetime.fromisoformat(first.time)
        assert first.time.endswith("Z") and 0 <= age.total_seconds() < 60
        assert sink.states == ["running"]

    asyncio.run(main())


def test_a_full_handoff_drops_and_counts(server: Server, channel: str) -> None:
    async def main() -> None:
        sink = Sink(limit=1)
        source = source_for(server, channel, sink)
        source.handoff_size = 3
        await source.start()
        try:
            await running(sink)
            await notify(server.url, channel, "0")
            received = [await sink.get()]  # the trigger is full from here on
            await notify(server.url, channel, "1")
            await until(lambda: sink.pending == 1)  # read, and waiting for room
            await notify(server.url, channel, *[str(n) for n in range(2, 12)])
            await until(lambda: source.dropped == 10 - 3)  # 3 fit in the handoff
            for _ in range(4):
                await source.ack(received[-1])
                await sink.done()
                received.append(await sink.get())
            assert [m.event.data for m in received] == [b"0", b"1", b"2", b"3", b"4"]
            await until(lambda: sink.pending == 0)
            assert source.dropped == 7 and sink.messages.empty()
        finally:
            await source.stop()

    asyncio.run(main())


def test_a_restarted_server_is_listened_to_again(server: Server, channel: str) -> None:
    async def main() -> None:
        sink = Sink()
        source = source_for(server, channel, sink)
        source.retry_max = 0.5
        await source.start()
        try:
            await running(sink)
            await notify(server.url, channel, "before")
            assert (await sink.get()).event.data == b"before"
            server.kill()
            await until(lambda: sink.states[-1:] == ["failing"])
            await asyncio.to_thread(server.start)
            await running(sink, times=2)
            assert sink.states[0] == "running" and "failing" in sink.states[1:-1]
            await notify(server.url, channel, "after")
            assert (await sink.get()).event.data == b"after"
        finally:
            await source.stop()

    asyncio.run(main())
