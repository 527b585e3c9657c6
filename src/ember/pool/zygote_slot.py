"""A revision's function zygote as its pool holds it: started once however many requests need
it at the same time, ready or not, released.

The start itself is the node's (`Pool.start_zygote`: the spare zygote or a fork of the root);
the slot bounds the import by `init_timeout` (the zygote enforces it too), refuses a module
that used more than `memory:` while importing, passes the import's warnings and output to the
function's log, and tells its pool when the zygote is ready and when it is gone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from ember.errors import DeployRejected, EmberError
from ember.pool.host import FORK, FRESH, SPECIALIZE
from ember.pool.target import Target
from ember.pool.zygote import FunctionZygote

log = logging.getLogger("ember.pool")
Start = Callable[[Target], Awaitable[tuple[FunctionZygote, bool]]]


class ZygoteSlot:
    def __init__(
        self,
        target: Target,
        start: Start,
        system_log: Callable[[Target, str], None],
        init_timeout: float,
        changed: Callable[[bool], None],
    ) -> None:
        self.target = target
        self._start = start
        self._log = system_log
        self._timeout = init_timeout
        self._changed = changed  # True: it became ready; False: it went or failed to start
        self.zygote: FunctionZygote | None = None
        self._task: asyncio.Task[str] | None = None

    @property
    def starting(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def alive(self) -> bool:
        """A zygote runs or is being started (it counts against memory from the start)."""
        return (self.zygote is not None and not self.zygote.dead) or self.starting

    def ready(self) -> FunctionZygote | None:
        """The zygote, if it is alive and its import succeeded."""
        zygote = self.zygote
        if zygote is None or zygote.dead or not zygote.ready.done():
            return None
        if zygote.ready.cancelled() or zygote.ready.exception() is not None:
            return None
        return zygote

    async def ensure(self) -> str:
        """Have a ready zygote; the tier says what it took: fork, specialize or fresh."""
        if self.zygote is not None and not self.zygote.dead and self.zygote.ready.done():
            self.zygote.ready.result()
            return FORK
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._spawn())
            # every waiter may have given up (timed out) by the time it fails: mark it seen
            self._task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(self._task)

    async def _spawn(self) -> str:
        try:
            tier = await self._load()
        except BaseException:
            self._changed(False)
            raise
        self._changed(True)
        return tier

    async def _load(self) -> str:
        zygote, fresh = await self._start(self.target)
        self.zygote = zygote
        zygote.on_close = functools.partial(self._closed, zygote)
        function, memory = self.target.function, self.target.spec.memory
        try:  # the zygote enforces init_timeout itself; this bounds a zygote that hangs anyway
            ready = await asyncio.wait_for(asyncio.shield(zygote.ready), self._timeout + 5.0)
        except TimeoutError:
            self._drop(zygote)
            raise DeployRejected(
                f"function '{function}' did not finish importing within {self._timeout:g} s; "
                "move slow work out of module level"
            ) from None
        except EmberError:
            self._drop(zygote)
            raise
        used_mb = ready.import_anon_kb // 1024
        if used_mb > memory:  # its cgroup allows more, for instances not yet moved
            self._drop(zygote)
            raise DeployRejected(
                f"function '{function}' used {used_mb} MB while importing its module, more "
                f"than memory: {memory} MB; raise memory: in ember.yaml or import less at "
                "module level"
            )
        for warning in ready.warnings:
            self._log(self.target, f"[ember] warning: {warning}\n")
        if ready.output:
            self._log(self.target, ready.output)
        log.info("zygote of %s ready in %.1f ms", self.target.label, ready.import_ms)
        return FRESH if fresh else SPECIALIZE

    def _drop(self, zygote: FunctionZygote) -> None:
        self.zygote = None
        zygote.stop()

    def _closed(self, zygote: FunctionZygote) -> None:
        """Its channel closed (it exited, or was stopped)."""
        if zygote is self.zygote:
            self._changed(False)

    def release(self) -> bool:
        """Stop the zygote (its instances die with it); True if there was one."""
        zygote, self.zygote = self.zygote, None
        if zygote is None:
            return False
        zygote.stop()
        return True
