"""What idle zygotes, instances and spares really use: read off the event loop, a few at a time.

The memory budget (`budget.py`) counts an idle process at its measured use. Measuring is a
read of `/proc/PID/smaps_rollup` per process (~0.3 ms for a small Python process), so it runs
on a worker thread of its own (`ember-usage`), never on the event loop, and only for
revisions that asked: one that went idle, whose zygote became ready or whose spare was
forked asks once, soon after, and then every `REFRESH` seconds while it holds something idle.
At most `BATCH` revisions are measured per tick, one batch at a time, so neither the loop's
work nor the thread's grows with the number of idle functions. Not on the cgroup thread: a
batch (up to ~100 processes, tens of milliseconds) held up the cgroup work queued behind it,
such as handing a spare zygote to a deploy (`Spares.take`) or placing a new instance.

PSS (proportional set size: private pages plus a share of the pages shared with others) is
what a process adds to the node: the sum over processes is the memory they hold together.
A process whose smaps cannot be read (gone, or not ours to read) is not measured and keeps
counting at its `memory:` setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from ember.pool.deadlines import Deadlines

log = logging.getLogger("ember.pool")
REFRESH = 60.0  # seconds between two measurements of a revision that stays idle
SETTLE = 0.3  # seconds after a revision asks before it is measured (output flushed, freed)
MIN_GAP = 5.0  # seconds between two measurements of one revision, however often it asks
BATCH = 32  # revisions per tick


def pss_kb(pids: Sequence[int]) -> list[int | None]:
    """PSS of each process in kB, None where it cannot be read. Blocking: a worker thread."""
    out: list[int | None] = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                data = f.read()
        except OSError:
            out.append(None)
            continue
        start = data.find(b"\nPss:")
        out.append(int(data[start + 5 : data.index(b"kB", start)]) if start >= 0 else None)
    return out


class Measurable(Protocol):
    """A revision's pool as the measurer sees it."""

    def measurable(self) -> list[tuple[object, int]]: ...  # (what, host pid) to measure now
    def measured(self, values: list[tuple[object, int]]) -> bool: ...  # True: measure again


Jobs = list[tuple[Measurable, list[tuple[object, int]]]]


class Usage:
    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ember-usage")
        self._due: Deadlines[Measurable] = Deadlines()
        self._last: dict[Measurable, float] = {}  # when each was last measured
        self._batch: asyncio.Task[None] | None = None
        self.measurements = 0  # processes measured since start (for tests and statistics)

    async def _read(self, pids: list[int]) -> list[int | None]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, pss_kb, pids)

    def measure(self, rp: Measurable, now: float) -> None:
        """`rp` changed (went idle, a new zygote or spare): measure it soon, but not more
        often than every `MIN_GAP` (what served since counts at its cap until then)."""
        soon = max(now + SETTLE, self._last.get(rp, -MIN_GAP) + MIN_GAP)
        when = self._due.when(rp)
        if when is None or when > soon:
            self._due.at(rp, soon)

    def forget(self, rp: Measurable) -> None:
        self._due.discard(rp)
        self._last.pop(rp, None)

    def tick(self, now: float) -> None:
        if self._batch is not None and not self._batch.done():
            return
        due = self._due.due(now, BATCH)
        for rp in due:
            self._last[rp] = now
        jobs = [(rp, rp.measurable()) for rp in due]
        jobs = [(rp, items) for rp, items in jobs if items]
        if jobs:
            self._batch = asyncio.get_running_loop().create_task(self._measure(jobs, now))

    async def _measure(self, jobs: Jobs, now: float) -> None:
        pids = [pid for _, items in jobs for _, pid in items]
        try:
            values = await self._read(pids)
        except Exception as exc:  # e.g. the thread pool is shutting down
            log.warning("could not measure memory use: %s", exc)
            return
        self.measurements += len(pids)
        at = 0
        for rp, items in jobs:
            got = values[at : at + len(items)]
            at += len(items)
            pairs = [(what, kb) for (what, _), kb in zip(items, got, strict=True) if kb is not None]
            if rp.measured(pairs):
                self._due.at(rp, now + REFRESH)

    async def shutdown(self) -> None:
        """Stop a batch under way (its reads end on their thread); measure no more."""
        self._due = Deadlines()
        if self._batch is not None and not self._batch.done():
            self._batch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batch
        self._thread.shutdown(wait=True)

    def __len__(self) -> int:
        """Revisions waiting to be measured."""
        return len(self._due)
