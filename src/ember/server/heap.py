"""The server's garbage collection: what it holds per function lives long, so it is frozen out of
the collector's way, and only what is young is collected.

CPython's full collection walks every tracked object that is not frozen. With 1,000 functions
deployed the server holds ~140,000 of them (routes, targets, revision pools, instance handles,
metric series), and a full collection took 22-50 ms on the event loop: a request that arrived
meanwhile waited. So:

* `settle()` collects what is not frozen (cheap: the frozen objects are not walked) and then
  freezes what survived: an object that outlived a full collection is taken as long-lived.
  It runs a moment after each publish (a deploy, a removal, a traffic change: what the control
  plane built then lives as long as its function) and every SETTLE_EVERY seconds (instances
  and series that requests created).
* Frozen objects are never collected, so garbage among them stays: an object frozen while alive
  that later dies in a reference cycle (a revision's pool after its function went, an instance
  handle after it stopped). That is bounded as CPython bounds its own oldest generation (there
  by a quarter): once the objects frozen since the last full collection of everything number
  GROWTH times what it left alive, `settle()` unfreezes them all, collects everything and
  freezes what is alive. So the frozen objects never number more than (1 + GROWTH) times what
  was alive at the last full collection, garbage included. That collection costs what a full
  one did before (50-90 ms at 600-1,000 functions on a loaded 2-core VM), but comes only when
  as many objects were frozen again as were alive: while functions are deployed (once between
  ~700 and ~2,000 functions), or after long churn (a deploy/rm loop: every ~350 functions; an
  instance started and stopped every second and frozen alive: every ~50 minutes). With a
  quarter it came every ~100 deploys, and soon after the deploys ended, where requests met it.

`statistics()` reports the collector's pauses by generation (a gc callback times each one) and
the frozen objects, for /metrics.
"""

from __future__ import annotations

import asyncio
import gc
import time
from bisect import bisect_left
from typing import Any

import msgspec

SETTLE_AFTER = 0.05  # seconds after a publish: the request that published has ended
SETTLE_EVERY = 5.0  # seconds between two settles without a publish
GROWTH = 1.0  # objects frozen since the last full collection, as a share of what it left alive
PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)  # seconds; then +Inf


class HeapStats(msgspec.Struct, frozen=True):
    """Garbage collections since the server started, by generation (0, 1, 2)."""

    collections: tuple[int, int, int]
    pause_seconds: tuple[float, float, float]  # total time spent in them
    pause_max_seconds: tuple[float, float, float]  # the longest one
    pause_buckets: tuple[tuple[int, ...], ...]  # per generation: count per PAUSE_BUCKETS + Inf
    frozen: int  # objects frozen (at the last full collection and since; some may be gone)
    full_collections: int  # settles that unfroze and collected everything (GROWTH)


class Heap:
    def __init__(self) -> None:
        self._started = 0.0
        self._collections = [0, 0, 0]
        self._seconds = [0.0, 0.0, 0.0]
        self._max = [0.0, 0.0, 0.0]
        self._buckets = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in range(3)]
        self._base = 0  # objects alive after the last full collection (then frozen)
        self._pending = 0  # objects frozen since
        self._full = 0
        self._soon: asyncio.TimerHandle | None = None
        self._every: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """At startup, once the server's long-lived parts are built: collect all, freeze all,
        time every collection from now on, settle every SETTLE_EVERY seconds."""
        gc.collect()
        self._base = len(gc.get_objects(generation=2))
        gc.freeze()
        gc.callbacks.append(self._timed)
        self._every = asyncio.get_running_loop().call_later(SETTLE_EVERY, self._periodic)

    def stop(self) -> None:
        for handle in (self._soon, self._every):
            if handle is not None:
                handle.cancel()
        self._soon = self._every = None
        if self._timed in gc.callbacks:
            gc.callbacks.remove(self._timed)

    def published(self) -> None:
        """The control plane published: settle a moment later (once for a burst of them)."""
        if self._soon is None and self._every is not None:
            self._soon = asyncio.get_running_loop().call_later(SETTLE_AFTER, self._after_publish)

    def settle(self) -> None:
        """Collect what is not frozen, freeze the survivors; everything once the objects frozen
        since that was last done number GROWTH of what it left alive. (Counted as they are
        frozen: `gc.get_freeze_count()` walks every frozen object, ~5 ms at 60,000.)"""
        gc.collect()
        self._pending += len(gc.get_objects(generation=2))  # the survivors: all in the oldest
        gc.freeze()
        if self._pending > self._base * GROWTH:
            self._full_collection()

    def _full_collection(self) -> None:
        gc.unfreeze()
        gc.collect()
        self._base = len(gc.get_objects(generation=2))
        self._pending = 0
        gc.freeze()
        self._full += 1

    def statistics(self) -> HeapStats:
        return HeapStats(
            collections=(self._collections[0], self._collections[1], self._collections[2]),
            pause_seconds=(self._seconds[0], self._seconds[1], self._seconds[2]),
            pause_max_seconds=(self._max[0], self._max[1], self._max[2]),
            pause_buckets=tuple(tuple(b) for b in self._buckets),
            frozen=self._base + self._pending,
            full_collections=self._full,
        )

    def _after_publish(self) -> None:
        self._soon = None
        self.settle()

    def _periodic(self) -> None:
        self._every = asyncio.get_running_loop().call_later(SETTLE_EVERY, self._periodic)
        self.settle()

    def _timed(self, phase: str, info: dict[str, Any]) -> None:
        """gc's callback (any thread; collections never overlap): time each collection."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        generation = info["generation"]
        self._collections[generation] += 1
        self._seconds[generation] += seconds
        if seconds > self._max[generation]:
            self._max[generation] = seconds
        self._buckets[generation][bisect_left(PAUSE_BUCKETS, seconds)] += 1
