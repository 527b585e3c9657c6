"""Cgroup work for the pool, always on one worker thread, never on the event loop.

Creating, moving into, reading and removing cgroups are file-system calls that can block: a
move can wait out an RCU grace period (7-19 ms measured here), an rmdir of a cgroup whose last
process is still dying fails and must be retried, and a revision's tree has many directories.
Everything here runs on the `ember-cgroup` thread; the event loop only schedules it. One
exception: handing a spare zygote its revision's limits (`run_now`), a few writes into
directories only that spare uses, on a deploy's or a start's path, goes to a thread of its
own, so it never waits behind a batch of cgroup work (a new instance's leaf, a spare's
directories, a sweep) queued on the cgroup thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple, TypeVar

from ember.pool.cgroup import Cgroups
from ember.pool.instance import Instance
from ember.pool.target import RevisionKey

log = logging.getLogger("ember.pool")
T = TypeVar("T")


class MemoryVerdict(NamedTuple):
    """What an instance's memory cgroup says about its end."""

    oom_killed: bool
    peak_kb: int


class Placement:
    def __init__(self, cgroups: Cgroups | None) -> None:
        self.cgroups = cgroups
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ember-cgroup")
        self._now = ThreadPoolExecutor(1, thread_name_prefix="ember-cgroup-now")
        self._leaves: set[str] = set()  # instance leaves still to remove (cgroup.procs paths)
        self._trees: set[str] = set()  # zygote and spare cgroup trees still to remove
        self._zygote_dirs: dict[RevisionKey, list[str]] = {}  # cgroups of each zygote started
        self._sweeping: Future[tuple[set[str], set[str]]] | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Any cgroup call, on the cgroup thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def run_now(self, fn: Callable[..., T], *args: object) -> T:
        """A cgroup call someone waits for, on cgroups nothing queued on the cgroup thread
        touches (a spare's own): on a thread of its own, not behind that queue."""
        return await asyncio.get_running_loop().run_in_executor(self._now, fn, *args)

    def rlimit_for(self, memory_mb: int) -> int:
        """Address-space limit the instance sets itself, where there are no cgroups."""
        return 0 if self.cgroups is not None else memory_mb * 1024 * 1024

    # ---- instances ----
    def place(self, inst: Instance, zygote_dir: str, memory_mb: int) -> None:
        """Move a new instance into its own memory cgroup, off the request's path: the
        instance serves meanwhile, for those few milliseconds under its zygote's cgroup."""
        if self.cgroups is None or not zygote_dir:
            return
        task = asyncio.get_running_loop().create_task(self._place(inst, zygote_dir, memory_mb))
        inst.placed = task

    async def _place(self, inst: Instance, rev: str, memory_mb: int) -> None:
        pid = await inst.pid_known
        inst.cgroup = await self.run(self._move, rev, inst.id, pid, memory_mb)

    def _move(self, rev: str, instance_id: str, pid: int, memory_mb: int) -> str:
        assert self.cgroups is not None
        try:
            procs = self.cgroups.create(rev, instance_id, memory_mb)
        except OSError as exc:
            log.warning("no memory cgroup for %s: %s", instance_id, exc)
            return ""
        try:
            self.cgroups.move(procs, pid)
        except OSError:  # it already exited
            self.cgroups.remove(procs)
            return ""
        return procs

    async def verdict(self, procs: str) -> MemoryVerdict:
        """Was the instance in `procs` killed for memory, and its peak; read off the loop."""
        if not procs or self.cgroups is None:
            return MemoryVerdict(False, 0)
        return await self.run(self._read_verdict, procs)

    def _read_verdict(self, procs: str) -> MemoryVerdict:
        assert self.cgroups is not None
        oom = self.cgroups.oom_killed(procs)
        return MemoryVerdict(oom, self.cgroups.peak_kb(procs) if oom else 0)

    def release(self, procs: str) -> None:
        """An instance's leaf is no longer needed: removed by the next sweep (retried while a
        dying process is still in it)."""
        if procs and self.cgroups is not None:
            self._leaves.add(procs)

    # ---- zygotes ----
    def zygote_dir(self, key: RevisionKey, directory: str) -> None:
        self._zygote_dirs.setdefault(key, []).append(directory)

    def forget_zygote_dirs(self, key: RevisionKey) -> None:
        """Queue the cgroups of a revision's earlier zygotes for removal."""
        for directory in self._zygote_dirs.pop(key, []):
            self._trees.add(directory)

    def drop_tree(self, slug: str) -> None:
        self._trees.add(slug)

    # ---- removal ----
    def sweep(self) -> None:
        """Start one removal pass on the cgroup thread unless one runs; what stays in use is
        tried again on a later sweep."""
        if self.cgroups is None or (self._sweeping is not None and not self._sweeping.done()):
            return
        if not self._leaves and not self._trees:
            return
        leaves, trees = set(self._leaves), set(self._trees)
        loop = asyncio.get_running_loop()
        self._sweeping = self._thread.submit(self._remove, leaves, trees)
        self._sweeping.add_done_callback(lambda done: loop.call_soon_threadsafe(self._swept, done))

    def _remove(self, leaves: set[str], trees: set[str]) -> tuple[set[str], set[str]]:
        assert self.cgroups is not None
        gone_leaves = {procs for procs in leaves if self.cgroups.remove(procs)}
        gone_trees = {slug for slug in trees if self.cgroups.remove_revision(slug)}
        return gone_leaves, gone_trees

    def _swept(self, done: Future[tuple[set[str], set[str]]]) -> None:
        if done.cancelled():
            return
        if done.exception() is not None:
            log.warning("removing cgroups failed: %s", done.exception())
            return
        gone_leaves, gone_trees = done.result()
        self._leaves.difference_update(gone_leaves)
        self._trees.difference_update(gone_trees)

    @property
    def pending(self) -> int:
        """Cgroups waiting for removal."""
        return len(self._leaves) + len(self._trees)

    def shutdown(self) -> None:
        self._now.shutdown(wait=True)
        self._thread.shutdown(wait=True)
