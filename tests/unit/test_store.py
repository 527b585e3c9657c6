"""The Store contract, run against every implementation (SQLite today)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from ember.spec import FunctionSpec, Quota
from ember.store.base import KeyRecord, Store
from ember.store.sqlite import SQLiteStore
from ember.telemetry.records import ActivationRecord, LogRecord

IMPLEMENTATIONS: dict[str, Callable[[Path], Store]] = {
    "sqlite": lambda tmp: SQLiteStore(tmp / "ember.db"),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    return lambda: IMPLEMENTATIONS[request.param](tmp_path)


def run(factory: Callable[[], Store], body: Callable[[Store], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        store = factory()
        await store.open()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def _act(i: int, fn: str = "f") -> ActivationRecord:
    return ActivationRecord(
        id=f"r{i}",
        function=fn,
        revision=1,
        start=float(i),
        duration_ms=1.0,
        status=200,
        tier="warm",
        instance="x",
        peak_memory_kb=10,
        billed_ms=1,
    )


def test_revisions_number_up_and_identical_is_unchanged(make_store: Callable[[], Store]) -> None:
    async def body(store: Store) -> None:
        spec = FunctionSpec(name="f")
        r1, c1 = await store.add_revision("f", spec, "h1", "b1", 1.0)
        r1b, c1b = await store.add_revision("f", spec, "h1", "b1", 2.0)
        r2, c2 = await store.add_revision("f", FunctionSpec(name="f", memory=256), "h2", "b1", 3.0)
        assert (r1.number, c1, r1b.number, c1b, r2.number, c2) == (1, True, 1, False, 2, True)
        fn = await store.function("f")
        assert fn is not None and fn.revision == 2 and fn.created_at == 1.0
        assert [r.number for r in await store.revisions("f")] == [1, 2]
        rev = await store.revision("f", 2)
        assert rev is not None and rev.spec.memory == 256
        back, created = await store.add_revision("f", spec, "h1", "b1", 4.0)
        assert (back.number, created) == (3, True), "going back to old code is a new revision"
        assert await store.delete_function("f")
        assert await store.function("f") is None and await store.revisions("f") == []
        assert not await store.delete_function("f")

    run(make_store, body)


def test_state_survives_reopening(make_store: Callable[[], Store]) -> None:
    async def write(store: Store) -> None:
        await store.add_revision("default/keep", FunctionSpec(name="keep"), "h", "b", 1.0)

    async def read(store: Store) -> None:
        assert [f.name for f in await store.functions()] == ["default/keep"]

    run(make_store, write)
    run(make_store, read)


def test_telemetry_is_queried_and_pruned(make_store: Callable[[], Store]) -> None:
    async def body(store: Store) -> None:
        logs = [
            LogRecord(
                ts=float(i),
                function="f",
                revision=1,
                request_id=f"r{i}",
                instance="x",
                stream="stdout",
                message=f"line {i}\n",
            )
            for i in range(10)
        ]
        await store.write_telemetry([_act(i) for i in range(10)] + [_act(99, "g")], logs)
        newest = await store.activations("f", 3)
        assert [a.id for a in newest] == ["r9", "r8", "r7"]
        since = await store.logs("f", since=5.0, after_id=0, limit=100)
        assert [r.message for r in since] == [f"line {i}\n" for i in range(5, 10)]
        after = await store.logs("f", since=0.0, after_id=since[-2].id, limit=100)
        assert [r.message for r in after] == ["line 9\n"]
        await store.prune(keep_activations=4, keep_logs=2)
        assert len(await store.activations("f", 100)) == 3
        assert len(await store.logs("f", 0.0, 0, 100)) == 2

    run(make_store, body)


def test_namespaces_keys_and_sealed_secrets(make_store: Callable[[], Store]) -> None:
    async def body(store: Store) -> None:
        assert [ns.name for ns in await store.namespaces()] == ["default"]
        team = await store.ensure_namespace("team", 5.0)
        again = await store.ensure_namespace("team", 6.0)
        assert team == again and team.id != (await store.namespaces())[0].id
        quota = Quota(functions=2, instances=3, memory_mb=512)
        updated = await store.set_quota("team", quota)
        assert updated is not None and updated.quota == quota
        assert await store.set_quota("nope", quota) is None
        key = KeyRecord(
            id="abcd1234",
            digest=b"d" * 32,
            name="ci",
            scopes=["deploy:team"],
            rate=5.0,
            burst=10,
            created_at=1.0,
        )
        await store.add_key(key)
        assert await store.keys() == [key]
        assert await store.revoke_key("abcd1234", 2.0)
        assert not await store.revoke_key("abcd1234", 3.0), "revoked once"
        assert (await store.keys())[0].revoked_at == 2.0
        await store.put_secret("team", "db", b"sealed-1", 1.0)
        await store.put_secret("team", "db", b"sealed-2", 2.0)
        [rec] = await store.secrets("team")
        assert (rec.sealed, rec.created_at, rec.updated_at) == (b"sealed-2", 1.0, 2.0)
        assert await store.secrets("default") == []
        assert await store.delete_secret("team", "db")
        assert not await store.delete_secret("team", "db")

    run(make_store, body)


def test_effective_revision_is_the_heaviest_alias_while_weights_are_set() -> None:
    from ember.store.base import Alias, effective_revision

    assert effective_revision(5, []) == 5
    assert effective_revision(5, [Alias("a", 3, 0), Alias("b", 4, 0)]) == 5  # pointers only
    assert effective_revision(5, [Alias("a", 3, 90), Alias("b", 4, 10)]) == 3
    assert effective_revision(4, [Alias("a", 3, 50), Alias("b", 4, 50)]) == 4  # tie: pointer
    assert effective_revision(7, [Alias("a", 3, 50), Alias("b", 4, 50)]) == 3
