"""The server's garbage-collection policy (server/heap.py), on this process's real collector."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from ember.server import heap
from ember.server.heap import Heap
from ember.telemetry.metrics import Metrics


class _Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def clean_gc() -> Iterator[None]:
    yield
    gc.unfreeze()
    gc.collect()


def test_settle_freezes_what_survives_and_leaves_garbage_out(clean_gc: None) -> None:
    async def main() -> None:
        h = Heap()
        h.start()
        try:
            kept = [_Node() for _ in range(100)]
            dropped = _Node()
            gone = weakref.ref(dropped)
            del dropped  # garbage before the settle: collected, not frozen
            before = gc.get_freeze_count()
            h.settle()
            assert gone() is None
            assert gc.get_freeze_count() >= before + 100  # the survivors are frozen
            assert len(kept) == 100
        finally:
            h.stop()

    asyncio.run(main())


def test_frozen_garbage_is_collected_once_the_frozen_objects_grew_by_growth(
    clean_gc: None,
) -> None:
    """Frozen objects are never collected: a revision pool frozen while it served and dropped
    later (its function removed) would stay forever. The bound: when the frozen objects grew
    by GROWTH since everything was last collected, everything is collected again."""

    async def main() -> None:
        h = Heap()
        h.start()
        try:
            base = gc.get_freeze_count()
            doomed = _Node()
            gone = weakref.ref(doomed)
            h.settle()  # frozen while alive
            del doomed  # now garbage among the frozen objects
            h.settle()
            assert gone() is not None  # small growth: it stays (bounded by what follows)
            live = [[_Node()] for _ in range(int(base * heap.GROWTH) // 2 + 1000)]
            h.settle()  # the frozen objects grew by more than GROWTH
            assert gone() is None
            assert h.statistics().full_collections == 1
            assert gc.get_freeze_count() <= (1 + heap.GROWTH) * (base + 3 * len(live))
        finally:
            h.stop()

    asyncio.run(main())


def test_a_publish_settles_a_moment_later_once_for_a_burst(clean_gc: None) -> None:
    async def main() -> None:
        h = Heap()
        h.start()
        settled: list[int] = []
        real = h.settle

        def counted() -> None:
            settled.append(1)
            real()

        h.settle = counted  # type: ignore[method-assign]
        try:
            for _ in range(5):
                h.published()
            await asyncio.sleep(heap.SETTLE_AFTER * 3)
            assert settled == [1]
        finally:
            h.stop()

    asyncio.run(main())


def test_metrics_show_the_collections_by_generation(clean_gc: None) -> None:
    async def main() -> None:
        h = Heap()
        h.start()
        try:
            gc.collect()
            gc.collect(0)
            text = Metrics(lambda: [], heap=h.statistics).render().decode()
        finally:
            h.stop()
        assert 'ember_gc_pause_seconds_count{generation="2"} ' in text
        count = next(
            line for line in text.splitlines() if line.startswith("ember_gc_pause_seconds_count")
        )
        assert float(count.rpartition(" ")[2]) >= 1  # generation 0 at least once
        full = [
            line
            for line in text.splitlines()
            if line.startswith('ember_gc_pause_seconds_bucket{generation="2",le="+Inf"}')
        ]
        assert len(full) == 1 and float(full[0].rpartition(" ")[2]) >= 1
        assert "ember_gc_frozen_objects " in text
        assert 'ember_gc_pause_max_seconds{generation="2"}' in text

    asyncio.run(main())
