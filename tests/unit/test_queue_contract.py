"""One suite, every queue backend: what the dispatcher relies on, checked against each of them
(SQLite in a temporary directory; NATS JetStream against a real nats-server the fixture starts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ember.queue.base import (
    CANCELLED,
    DEAD,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Attempt,
    Invocation,
    Queue,
    Result,
)
from ember.queue.sqlite import SQLiteQueue
from tests.natsserver import NatsServer, nats_queue

Factory = Callable[[], Queue]


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(params=["sqlite", "nats"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """A maker of queue objects over one storage: a second one sees what the first stored."""
    if request.param == "sqlite":
        return lambda: SQLiteQueue(tmp_path / "queue.db")
    server: NatsServer = request.getfixturevalue("nats_server")
    return nats_queue(server, prefix=f"t{abs(hash(tmp_path)) % 10**8}")


def run(factory: Factory, body: Callable[[Queue], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with opened(factory) as queue:
            return await body(queue)

    return asyncio.run(main())


@asynccontextmanager
async def opened(factory: Factory) -> AsyncIterator[Queue]:
    queue = factory()
    await queue.open()
    try:
        yield queue
    finally:
        await queue.close()


_ids = iter(range(10**9))


def invocation(function: str = "default/a", **changes: Any) -> Invocation:
    n = next(_ids)
    fields: dict[str, Any] = {
        "id": f"{n:032x}",
        "function": function,
        "method": "POST",
        "path": f"/fn/{function}/x",
        "raw_path": f"/fn/{function}/x",
        "query": b"q=1",
        "headers": [(b"content-type", b"text/plain")],
        "body": f"body {n}".encode(),
        "accepted": time.time(),
        "not_before": time.time(),
    }
    fields.update(changes)
    return Invocation(**fields)


def attempt(number: int, outcome: str = "5xx") -> Attempt:
    return Attempt(number, "r" * 32, time.time(), 1.5, 500, outcome)


def test_put_is_kept_whole_across_a_reopen(factory: Factory) -> None:
    inv = invocation(body=b"\x00\xff" * 1000, callback="http://127.0.0.1:1/cb")
    run(factory, lambda q: q.put(inv))
    got = run(factory, lambda q: q.get(inv.id))
    assert got is not None
    assert (got.id, got.function, got.status, got.body, got.query) == (
        inv.id,
        "default/a",
        QUEUED,
        inv.body,
        b"q=1",
    )
    assert got.headers == [(b"content-type", b"text/plain")]
    assert got.callback == "http://127.0.0.1:1/cb"
    assert run(factory, lambda q: q.get("f" * 32)) is None


def test_an_idempotency_key_returns_the_first_and_stores_nothing(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        first = await q.put(invocation(idempotency_key="k1"))
        again = await q.put(invocation(idempotency_key="k1"))
        other_function = await q.put(invocation("default/b", idempotency_key="k1"))
        assert again.id == first.id
        assert other_function.id != first.id
        assert [i.id for i in await q.list("default/a")] == [first.id]
        assert (await q.backlog())["default/a"].depth == 1

    run(factory, body)


def test_take_hands_out_due_ones_oldest_first_once(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        now = time.time()
        a = await q.put(invocation(accepted=now, not_before=now - 2))
        b = await q.put(invocation(accepted=now, not_before=now - 1))
        later = await q.put(invocation(accepted=now, not_before=now + 3600))
        await q.put(invocation("default/b"))
        taken = await q.take("default/a", 10)
        assert [i.id for i in taken] == [a.id, b.id]
        assert {i.status for i in taken} == {RUNNING}
        assert await q.take("default/a", 10) == []
        assert (await q.get(a.id)).status == RUNNING  # type: ignore[union-attr]
        assert await q.next_due("default/a") == pytest.approx(later.not_before)
        assert [i.function for i in await q.take("default/b", 10)] == ["default/b"]
        assert await q.next_due("default/b") is None

    run(factory, body)


def test_take_respects_its_limit(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        for _ in range(5):
            await q.put(invocation())
        assert len(await q.take("default/a", 2)) == 2
        assert len(await q.take("default/a", 10)) == 3

    run(factory, body)


def test_a_retry_waits_until_due_and_keeps_its_attempts(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        await q.put(invocation())
        (inv,) = await q.take("default/a", 1)
        inv.attempts.append(attempt(1))
        inv.status, inv.not_before = QUEUED, time.time() + 0.5
        await q.save(inv)
        assert await q.take("default/a", 1) == []
        assert await q.next_due("default/a") == pytest.approx(inv.not_before)
        await asyncio.sleep(0.6)
        (again,) = await q.take("default/a", 1)
        assert again.id == inv.id
        assert [a.outcome for a in again.attempts] == ["5xx"]

    run(factory, body)


def test_an_ended_one_keeps_its_result_and_leaves_the_backlog(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        await q.put(invocation())
        (inv,) = await q.take("default/a", 1)
        inv.attempts.append(attempt(1, "ok"))
        inv.status, inv.ended, inv.notify = SUCCEEDED, time.time(), True
        inv.result = Result(200, [(b"x-a", b"1")], b"done")
        await q.save(inv)
        assert "default/a" not in await q.backlog()
        assert [i.id for i in await q.unsent()] == [inv.id]
        inv.notify = False
        await q.save(inv)
        assert await q.unsent() == []

    run(factory, body)
    (got,) = run(factory, lambda q: q.list("default/a"))
    assert got.status == SUCCEEDED
    assert got.result == Result(200, [(b"x-a", b"1")], b"done")


def test_list_is_newest_first_and_filters_by_status(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        ids = [(await q.put(invocation())).id for _ in range(4)]
        (taken,) = await q.take("default/a", 1)
        assert [i.id for i in await q.list("default/a")] == ids[::-1]
        assert [i.id for i in await q.list("default/a", limit=2)] == ids[::-1][:2]
        assert [i.id for i in await q.list("default/a", RUNNING)] == [taken.id]
        assert [i.id for i in await q.list("default/a", QUEUED)] == ids[:0:-1]
        assert await q.list("default/b") == []

    run(factory, body)


def test_cancel_takes_only_a_queued_one(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        queued = await q.put(invocation(not_before=time.time() + 3600))
        running = await q.put(invocation())
        await q.take("default/a", 10)
        cancelled = await q.cancel(queued.id, time.time())
        assert cancelled is not None and cancelled.status == CANCELLED
        assert await q.cancel(running.id, time.time()) is None
        assert await q.cancel(queued.id, time.time()) is None  # already
        assert (await q.get(queued.id)).status == CANCELLED  # type: ignore[union-attr]
        assert "default/a" not in await q.backlog()
        assert await q.take("default/a", 10) == []

    run(factory, body)


async def _kill(q: Queue, n: int, function: str = "default/a") -> list[Invocation]:
    dead = []
    for inv in await q.take(function, n):
        inv.attempts.append(attempt(1))
        inv.status, inv.ended = DEAD, time.time()
        await q.save(inv)
        dead.append(inv)
    return dead


def test_replay_queues_dead_ones_again_and_purge_forgets_them(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        for _ in range(3):
            await q.put(invocation())
        d1, d2, d3 = await _kill(q, 3)
        assert [i.id for i in await q.list("default/a", DEAD)] == [d3.id, d2.id, d1.id]
        (again,) = await q.replay("default/a", [d2.id], time.time())
        assert (again.id, again.status, again.attempts) == (d2.id, QUEUED, [])
        (taken,) = await q.take("default/a", 10)
        assert taken.id == d2.id and taken.body == d2.body
        assert [i.id for i in await q.replay("default/a", None, time.time())] == [d1.id, d3.id]
        await _kill(q, 2)
        assert await q.purge("default/a") == 2
        assert await q.list("default/a", DEAD) == []
        assert [i.id for i in await q.list("default/a")] == [d2.id]

    run(factory, body)


def test_backlog_counts_queued_ones_and_their_oldest(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        await q.put(invocation(accepted=1000.0))
        await q.put(invocation(accepted=2000.0, not_before=time.time() + 60))
        await q.put(invocation("default/b", accepted=3000.0))
        await q.put(invocation("default/c"))
        await q.take("default/c", 1)
        backlog = await q.backlog()
        assert set(backlog) == {"default/a", "default/b"}
        assert (backlog["default/a"].depth, backlog["default/a"].oldest) == (2, 1000.0)
        assert (backlog["default/b"].depth, backlog["default/b"].oldest) == (1, 3000.0)

    run(factory, body)


def test_a_reopen_queues_what_was_running_again_with_an_interrupted_attempt(
    factory: Factory,
) -> None:
    inv = run(factory, lambda q: q.put(invocation()))
    assert [i.id for i in run(factory, lambda q: q.take("default/a", 10))] == [inv.id]

    async def body(q: Queue) -> None:
        (again,) = await q.take("default/a", 10)
        assert again.id == inv.id
        assert [(a.number, a.outcome) for a in again.attempts] == [(1, "interrupted")]
        assert again.counted_attempts == 0

    run(factory, body)


def test_prune_forgets_ended_ones_and_frees_their_idempotency_keys(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        first = await q.put(invocation(idempotency_key="k"))
        kept = await q.put(invocation())
        (inv, _) = await q.take("default/a", 10)
        assert inv.id == first.id
        inv.status, inv.ended = SUCCEEDED, time.time() - 100
        await q.save(inv)
        assert await q.prune(time.time() - 50) == 1
        assert await q.get(first.id) is None
        assert (await q.put(invocation(idempotency_key="k"))).id != first.id
        assert (await q.get(kept.id)) is not None

    run(factory, body)


def test_forget_drops_every_invocation_of_a_function(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        a = await q.put(invocation())
        b = await q.put(invocation("default/b"))
        await q.forget("default/a")
        assert await q.get(a.id) is None
        assert await q.take("default/a", 10) == []
        assert (await q.get(b.id)) is not None

    run(factory, body)


def test_concurrent_puts_are_each_stored_once(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        invs = [invocation() for _ in range(300)]
        stored = await asyncio.gather(*(q.put(i) for i in invs))
        assert {s.id for s in stored} == {i.id for i in invs}
        assert (await q.backlog())["default/a"].depth == 300
        taken = await q.take("default/a", 1000)
        assert sorted(i.id for i in taken) == sorted(i.id for i in invs)

    run(factory, body)


def test_a_reopen_keeps_what_waits_waiting_and_what_is_due_takeable(factory: Factory) -> None:
    async def first(q: Queue) -> tuple[Invocation, Invocation]:
        retry = await q.put(invocation())
        due = await q.put(invocation())
        (taken, _) = await q.take("default/a", 10)
        taken.attempts.append(attempt(1))
        taken.status, taken.not_before = QUEUED, time.time() + 0.5
        await q.save(taken)
        return retry, due

    retry, due = run(factory, first)

    async def second(q: Queue) -> None:
        assert [i.id for i in await q.take("default/a", 10)] == [due.id]
        assert await q.take("default/a", 10) == []
        assert (await q.backlog())["default/a"].depth == 1
        next_due = await q.next_due("default/a")
        assert next_due is not None and next_due > time.time()
        await asyncio.sleep(next_due - time.time() + 0.1)
        (again,) = await q.take("default/a", 10)
        assert again.id == retry.id and [a.outcome for a in again.attempts] == ["5xx"]

    run(factory, second)


def test_take_finds_due_ones_behind_many_that_wait(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        for _ in range(7):
            await q.put(invocation(not_before=time.time() + 3600))
        due = [(await q.put(invocation())).id for _ in range(2)]
        assert [i.id for i in await q.take("default/a", 2)] == due
        assert await q.take("default/a", 2) == []

    run(factory, body)


def test_concurrent_takes_and_cancels_hand_each_out_once(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        ids = [(await q.put(invocation())).id for _ in range(60)]
        takes = [q.take("default/a", 7) for _ in range(6)]
        cancels = [q.cancel(id, time.time()) for id in ids[::3]]
        outcomes = await asyncio.gather(*takes, *cancels)
        taken = [i.id for batch in outcomes[: len(takes)] for i in batch]
        taken += [i.id for i in await q.take("default/a", 100)]
        cancelled = [c.id for c in outcomes[len(takes) :] if c is not None]
        assert len(taken) == len(set(taken)) and not set(taken) & set(cancelled)
        assert sorted(taken + cancelled) == sorted(ids)

    run(factory, body)


def test_concurrent_puts_with_one_idempotency_key_store_one(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        stored = await asyncio.gather(*(q.put(invocation(idempotency_key="k")) for _ in range(20)))
        assert len({s.id for s in stored}) == 1
        assert [i.id for i in await q.list("default/a")] == [stored[0].id]

    run(factory, body)
    again = run(factory, lambda q: q.put(invocation(idempotency_key="k")))
    assert [i.id for i in run(factory, lambda q: q.list("default/a"))] == [again.id]


def test_unsent_ones_are_found_after_a_reopen_and_pruned_only_once_sent(factory: Factory) -> None:
    async def end(q: Queue) -> Invocation:
        await q.put(invocation(callback="http://127.0.0.1:1/cb"))
        (inv,) = await q.take("default/a", 1)
        inv.status, inv.ended, inv.notify = SUCCEEDED, time.time() - 100, True
        await q.save(inv)
        assert await q.prune(time.time() - 50) == 0
        return inv

    inv = run(factory, end)

    async def send(q: Queue) -> None:
        (unsent,) = await q.unsent()
        assert unsent.id == inv.id and unsent.notify
        unsent.notify = False
        await q.save(unsent)
        assert await q.unsent() == []
        assert await q.prune(time.time() - 50) == 1
        assert await q.get(inv.id) is None

    run(factory, send)


def test_a_save_after_forget_stores_nothing_and_forget_counts(factory: Factory) -> None:
    async def body(q: Queue) -> None:
        await q.put(invocation())
        await q.put(invocation(not_before=time.time() + 3600))
        (running,) = await q.take("default/a", 10)
        assert await q.forget("default/a") == 2
        running.status, running.ended = SUCCEEDED, time.time()
        await q.save(running)
        assert await q.get(running.id) is None
        assert await q.list("default/a") == []
        assert await q.next_due("default/a") is None
        assert "default/a" not in await q.backlog()

    run(factory, body)


def test_an_ended_put_is_stored_ended_never_taken_and_kept_to_send(factory: Factory) -> None:
    """A trigger's event whose one attempt settled it (dead with retries: 0) is stored ended."""

    async def body(q: Queue) -> None:
        now = time.time()
        dead = invocation(status=DEAD, ended=now, reason="no retries left", notify=True)
        dead.attempts = [Attempt(1, "r1", now, 1.0, 500, "5xx")]
        await q.put(dead)
        assert await q.take("default/a", 10) == []
        assert await q.next_due("default/a") is None
        assert "default/a" not in await q.backlog()
        (listed,) = await q.list("default/a", DEAD)
        assert (listed.id, listed.reason, listed.attempts) == (dead.id, dead.reason, dead.attempts)
        assert [inv.id for inv in await q.unsent()] == [dead.id]
        (replayed,) = await q.replay("default/a", [dead.id], now)
        assert (replayed.id, replayed.status) == (dead.id, QUEUED)
        assert [inv.id for inv in await q.take("default/a", 10)] == [dead.id]

    run(factory, body)
