"""Telemetry batches larger than one INSERT statement can bind (SQLite's limit of bound
values) arrive whole and unchanged."""

from __future__ import annotations

from collections.abc import Callable

from ember.store.base import Store
from ember.telemetry.records import ActivationRecord, LogRecord
from tests.unit.test_store import make_store, run  # noqa: F401 (the fixture)


def test_a_flush_bigger_than_one_statement_is_written_whole(
    make_store: Callable[[], Store],  # noqa: F811
) -> None:
    activations = [
        ActivationRecord(
            id=f"r{i:05d}",
            function="default/f",
            revision=3,
            start=1000.0 + i,
            duration_ms=0.25 * i,
            status=200 if i % 7 else 502,
            tier="warm" if i % 3 else "spare",
            instance=f"i{i % 4}",
            peak_memory_kb=i,
            billed_ms=1,
            error=None if i % 7 else "ValueError: ünïcode ✓",
        )
        for i in range(7001)
    ]
    logs = [
        LogRecord(
            ts=2000.0 + i,
            function="default/f",
            revision=3,
            request_id=f"r{i:05d}",
            instance="i0",
            stream="stdout",
            message=f"line {i} ✓\n",
        )
        for i in range(9001)
    ]

    async def body(store: Store) -> None:
        await store.write_telemetry(activations, logs)
        got = await store.activations("default/f", 10_000)
        assert sorted(got, key=lambda a: a.id) == activations
        lines = await store.logs("default/f", 0.0, 0, 10_000)
        assert [(r.request_id, r.message) for r in lines] == [
            (r.request_id, r.message) for r in logs
        ]

    run(make_store, body)
