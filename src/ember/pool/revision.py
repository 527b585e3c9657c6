"""One revision's pool: idle instances, a FIFO of waiting requests, starts within `scale.max`.

A `RevisionPool` talks to the node's pool only through `PoolHost`, the few things it needs
from it (quotas, the memory budget, zygotes from the root, cgroup placement, logs), and offers
the memory budget its idle instances and zygote as `Eviction`s rather than being edited.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import signal
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import msgspec

from ember.autoscaler.scaler import Decision, Window, decide
from ember.errors import (
    CapacityError,
    DeployRejected,
    EmberError,
    FunctionCrashed,
    FunctionError,
    FunctionMemoryExceeded,
    FunctionTimeout,
    PlatformError,
)
from ember.pool.budget import Eviction
from ember.pool.host import PoolHost, PoolSettings, RevisionStats
from ember.pool.instance import Instance
from ember.pool.placement import MemoryVerdict
from ember.pool.target import Target
from ember.pool.zygote import FunctionZygote
from ember.wire.messages import Invoke, Log, Result

log = logging.getLogger("ember.pool")
WARM, FORK, SPECIALIZE, FRESH = "warm", "fork", "specialize", "fresh"


class RevisionPool:
    def __init__(self, target: Target, host: PoolHost, settings: PoolSettings) -> None:
        self.target = target
        self.spec = target.spec
        self.host = host
        self.settings = settings
        self.instances: dict[str, Instance] = {}
        self.idle: list[Instance] = []
        self.waiters: deque[asyncio.Future[Instance | None]] = deque()
        self.starting = 0
        self.zygote: FunctionZygote | None = None
        self._zygote_task: asyncio.Task[str] | None = None
        self.retired = False
        self.standby = False  # reachable only through an alias without traffic weight
        self.warmed_at = -math.inf  # when a deploy, rollback or traffic change started it
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures = 0  # keep-warm starts that failed in a row
        self.backoff_until = 0.0
        self.starts = {WARM: 0, FORK: 0, SPECIALIZE: 0, FRESH: 0}
        # Concurrency for the autoscaler: requests in flight or waiting, integrated over time.
        self.demand = 0
        self._area = 0.0
        self._mark = self._sampled = time.monotonic()
        self.window = Window(self.spec.scale.window)

    # ---- the hot path ----
    async def invoke(
        self, msg: Invoke, loop_deadline: float, caller_deadline: bool = False
    ) -> tuple[Result, str, Instance]:
        """`caller_deadline`: the deadline is the caller's (X-Ember-Timeout), shorter than the
        function's timeout; when it passes, only this request ends."""
        self._load(1)
        try:
            inst, tier = await self.acquire(loop_deadline)
            while inst.dead:  # died between the hand-off and now: take another
                inst.reserved -= 1
                inst, tier = await self.acquire(loop_deadline)
            try:
                fut = inst.call(msg)
                timer = asyncio.get_running_loop().call_at(
                    loop_deadline, self._timed_out, inst, msg, caller_deadline
                )
                try:
                    result = await fut
                finally:
                    timer.cancel()
            finally:
                self.release(inst)
        finally:
            self._load(-1)
        self.starts[tier] += 1
        return result, tier, inst

    def _load(self, delta: int) -> None:
        now = time.monotonic()
        self._area += self.demand * (now - self._mark)
        self._mark = now
        was_idle = self.demand == 0
        self.demand += delta
        if was_idle and delta > 0:
            self.host.activity(self.target, busy=True, now=now)
        elif self.demand == 0:
            self.host.activity(self.target, busy=False, now=now)

    async def acquire(self, loop_deadline: float) -> tuple[Instance, str]:
        while True:
            inst = self._take_idle()
            if inst is not None:
                return inst, WARM
            if self.count < self.spec.scale.max:
                return await self._start_for_request(loop_deadline)
            got = await self._wait(loop_deadline)
            if got is not None:
                return got, WARM
            # woken because room was freed: check again, someone may have taken it meanwhile

    async def _start_for_request(self, loop_deadline: float) -> tuple[Instance, str]:
        """A start bounded by the request's deadline; init failures are the function's (502)."""
        try:
            async with asyncio.timeout_at(loop_deadline):  # same task: `starting` counts at once
                return await self._start(loop_deadline)
        except TimeoutError:
            raise FunctionTimeout(
                f"function '{self.target.function}' timed out after {self.spec.timeout:g} s "
                "while its instance was starting (slow module import?)"
            ) from None
        except DeployRejected as exc:
            error = FunctionError(exc.message, code="init_failed", detail=exc.detail)
            for waiter in self.waiters:  # they would only import the same module again
                if not waiter.done():
                    waiter.set_exception(error)
            raise error from None

    @property
    def count(self) -> int:
        return len(self.instances) + self.starting

    def _take_idle(self) -> Instance | None:
        while self.idle:
            inst = self.idle[-1]
            if not inst.has_room:
                self.idle.pop()
                inst.listed = False
                continue
            inst.reserved += 1
            if not inst.has_room:
                self.idle.pop()
                inst.listed = False
            return inst
        return None

    async def _wait(self, loop_deadline: float) -> Instance | None:
        if len(self.waiters) >= self.settings.queue_depth:
            raise CapacityError(
                f"function '{self.target.function}' is at scale.max={self.spec.scale.max} "
                f"with {len(self.waiters)} requests waiting; retry later or raise scale.max",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Instance | None] = loop.create_future()
        self.waiters.append(fut)
        timer = loop.call_at(loop_deadline, _expire, fut, self.target.function, self.spec.scale.max)
        try:
            return await fut
        finally:
            timer.cancel()
            if fut in self.waiters:
                self.waiters.remove(fut)

    def release(self, inst: Instance) -> None:
        if not inst.has_room:
            return
        while self.waiters and inst.has_room:
            waiter = self.waiters.popleft()
            if not waiter.done():
                inst.reserved += 1
                waiter.set_result(inst)
        if inst.has_room and not inst.listed:
            self.idle.append(inst)
            inst.listed = True
        if not inst.busy:
            inst.idle_since = time.monotonic()

    # ---- starting instances ----
    @property
    def zygote_alive(self) -> bool:
        """A zygote runs or is being started (it counts against memory from the start)."""
        if self.zygote is not None and not self.zygote.dead:
            return True
        return self._zygote_task is not None and not self._zygote_task.done()

    async def _start(self, loop_deadline: float | None) -> tuple[Instance, str]:
        self.host.check_quota(self.target)  # the namespace's quotas (429 naming the one reached)
        self.starting += 1  # holds its place within scale.max (and its memory) from here
        try:
            await self.host.make_room(self, loop_deadline)  # the node's memory budget
            tier = await self.ensure_zygote()
            assert self.zygote is not None
            try:
                inst = await self._fork(self.zygote)
            except PlatformError:  # it died and we have not read its EOF yet: one new zygote
                self.zygote.stop()
                tier = await self.ensure_zygote()
                assert self.zygote is not None
                inst = await self._fork(self.zygote)
        except BaseException:
            self.starting -= 1
            self._wake_waiter()  # the room this start held is free again
            self.host.freed()
            raise
        self.starting -= 1
        inst.reserved += 1
        self.instances[inst.id] = inst
        self.release(inst)  # room beyond this request (concurrency > 1): waiters, idle list
        return inst, tier

    def _wake_waiter(self) -> None:
        while self.waiters and self.count < self.spec.scale.max:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # room for one more: the waiter starts it
                return

    async def _fork(self, zygote: FunctionZygote) -> Instance:
        iid = f"{self.target.function}-{self.target.number}-{secrets.token_hex(3)}"
        inst = await zygote.fork(
            iid, self.host.rlimit_for(self.spec.memory), self._on_log, self._on_lost
        )
        self.host.place(inst, zygote.cgroup_dir, self.spec.memory)
        return inst

    async def ensure_zygote(self) -> str:
        """Have a ready zygote; the tier says what it took: fork, specialize or fresh."""
        if self.zygote is not None and not self.zygote.dead and self.zygote.ready.done():
            self.zygote.ready.result()
            return FORK
        if self._zygote_task is None or self._zygote_task.done():
            self._zygote_task = asyncio.get_running_loop().create_task(self._spawn_zygote())
            # every waiter may have given up (timed out) by the time it fails: mark it seen
            self._zygote_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(self._zygote_task)

    async def _spawn_zygote(self) -> str:
        zygote, fresh = await self.host.start_zygote(self.target)
        timeout = self.settings.init_timeout
        self.zygote = zygote
        try:  # the zygote enforces init_timeout itself; this bounds a zygote that hangs anyway
            ready = await asyncio.wait_for(asyncio.shield(zygote.ready), timeout + 5.0)
        except TimeoutError:
            self.zygote = None
            zygote.stop()
            raise DeployRejected(
                f"function '{self.target.function}' did not finish importing within "
                f"{timeout:g} s; move slow work out of module level"
            ) from None
        except EmberError:
            self.zygote = None
            zygote.stop()
            raise
        used_mb = ready.import_anon_kb // 1024
        if used_mb > self.spec.memory:  # its cgroup allows more, for instances not yet moved
            self.zygote = None
            zygote.stop()
            raise DeployRejected(
                f"function '{self.target.function}' used {used_mb} MB while importing its "
                f"module, more than memory: {self.spec.memory} MB; raise memory: in ember.yaml "
                "or import less at module level"
            )
        for warning in ready.warnings:
            self.host.system_log(self.target, f"[ember] warning: {warning}\n")
        if ready.output:
            self.host.system_log(self.target, ready.output)
        log.info("zygote of %s ready in %.1f ms", self.target.label, ready.import_ms)
        return FRESH if fresh else SPECIALIZE

    async def warm_one(self) -> None:
        if self.count >= self.spec.scale.max:  # requests started their own meanwhile
            return
        inst, _tier = await self._start(None)
        inst.reserved -= 1
        self.release(inst)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- instance events ----
    def _on_log(self, inst: Instance, msg: Log) -> None:
        self.host.instance_log(self.target, inst.id, msg)

    def _on_lost(self, inst: Instance) -> None:
        self.forget(inst)
        self._background(self._bury(inst))
        self._wake_waiter()
        self.host.freed()

    async def _bury(self, inst: Instance) -> None:
        try:
            status: int | None = await asyncio.wait_for(asyncio.shield(inst.exit_status), 2.0)
        except TimeoutError:
            status = None
        if inst.placed is not None:
            if not inst.pid_known.done():
                inst.pid_known.cancel()  # no pid will come: placement ends before any move
            await asyncio.wait({inst.placed}, timeout=5.0)  # a move under way finishes first
        if inst.inflight:
            verdict = await self.host.verdict(inst.cgroup)  # read on the cgroup thread
            inst.fail_all(inst.death or self._cause(verdict, status))
        inst.close_pidfd()
        self.host.release_cgroup(inst.cgroup)

    def _cause(self, verdict: MemoryVerdict, status: int | None) -> EmberError:
        name, mb = self.target.function, self.spec.memory
        if verdict.oom_killed:
            peak = verdict.peak_kb // 1024
            return FunctionMemoryExceeded(
                f"function '{name}' exceeded its memory limit of {mb} MB (peak {peak} MB) and "
                "was killed; raise memory: in ember.yaml"
            )
        if status is not None and status < 0:
            what = f"was killed by {signal.Signals(-status).name}"
        elif status is not None:
            what = f"exited with code {status}"
        else:
            what = "exited"
        return FunctionCrashed(
            f"function '{name}' instance {what} while handling the request (a crash, os._exit "
            "or sys.exit); the next request gets a new instance"
        )

    def _timed_out(self, inst: Instance, msg: Invoke, caller_deadline: bool) -> None:
        fut = inst.inflight.get(msg.id)
        if fut is None or fut.done():
            return  # its result came in the same loop turn: nothing ran over its time
        del inst.inflight[msg.id]
        if caller_deadline:
            what = "the caller's deadline (X-Ember-Timeout) passed while it ran"
        else:
            what = f"it timed out after {self.spec.timeout:g} s"
        fut.set_exception(
            FunctionTimeout(
                f"function '{self.target.function}': {what}, and the request was ended; "
                "raise timeout: in ember.yaml (at most 15m)"
            )
        )
        if caller_deadline and inst.concurrency > 1:
            return  # other requests run on it: they keep their own deadlines; its answer is dropped
        inst.kill(
            FunctionCrashed(
                f"function '{self.target.function}' instance was killed because another request "
                "on it timed out"
            )
        )

    # ---- autoscaling ----
    def autoscale(self, now: float) -> Decision:
        """One tick: sample the concurrency, ask the scaler, start or stop instances."""
        self._area += self.demand * (now - self._mark)
        span = now - self._sampled
        mean = self._area / span if span > 0 else float(self.demand)
        self._area, self._mark, self._sampled = 0.0, now, now
        self.window.add(now, mean, self.count, active=self.demand > 0 or mean > 0)
        scale = self.spec.scale
        if self.standby and scale.min:
            scale = msgspec.structs.replace(scale, min=0)
        decision = decide(scale, self.spec.concurrency, self.window, now)
        self.window.keep(decision)
        desired = decision.desired
        if desired > self.count and not self.waiters and time.monotonic() >= self.backoff_until:
            for _ in range(desired - self.count):
                self._background(self._warm_quietly())
        elif desired < self.count:
            for inst in self._idle_oldest_first()[: self.count - desired]:
                inst.stop()
        return decision

    def _idle_oldest_first(self) -> list[Instance]:
        """Instances with nothing to do, longest idle first: the first to stop or evict."""
        idle = [i for i in self.instances.values() if not i.busy and not i.dead]
        return sorted(idle, key=lambda i: i.idle_since)

    def drain(self) -> None:
        """A retired revision: stop what is idle; the zygote goes once nothing runs."""
        for inst in list(self.instances.values()):
            if not inst.busy:
                inst.stop()
        if not self.instances and not self.starting and self.zygote is not None:
            self.zygote.stop()
            self.zygote = None

    def release_zygote(self) -> None:
        if self.zygote is not None:
            self.zygote.stop()
            self.zygote = None
            self.host.freed()

    def forget(self, inst: Instance) -> None:
        """An instance being stopped no longer counts (its memory is on its way back)."""
        self.instances.pop(inst.id, None)
        if inst.listed:
            self.idle.remove(inst)
            inst.listed = False

    def prewarm(self) -> None:
        """Start the zygote ahead of the request the keep-alive histogram expects."""
        if not self.zygote_alive:
            self._background(self._prewarm_quietly())

    async def _prewarm_quietly(self) -> None:
        try:
            self.host.check_prewarm(self)
            await self.ensure_zygote()
        except Exception as exc:
            self._back_off(exc, "pre-warm")
        else:
            self._failures = 0

    async def _warm_quietly(self) -> None:
        try:
            await self.warm_one()
        except Exception as exc:  # any failure: back off, never retry every tick
            self._back_off(exc, "keep warm")
        else:
            self._failures = 0

    def _back_off(self, exc: Exception, what: str) -> None:
        self._failures += 1
        delay = min(60.0, 0.5 * 2**self._failures)
        self.backoff_until = time.monotonic() + delay
        log.warning("could not %s %s (retrying in %.0f s): %s", what, self.target.label, delay, exc)

    async def hold_scale(self, n: int) -> int:
        """`ember scale`: stop idle instances down to n, or start up to n (within scale.max),
        now; the autoscaler then holds exactly n for the idle grace before it decides again."""
        n = min(n, self.spec.scale.max)
        self.window.held, self.window.held_until = n, time.monotonic() + self.spec.scale.idle
        for inst in self._idle_oldest_first()[: max(0, self.count - n)]:
            inst.stop()
        extra = max(0, n - self.count)
        await asyncio.gather(*(self.warm_one() for _ in range(extra)))
        return self.count

    # ---- the node's memory budget (an Occupant) ----
    @property
    def label(self) -> str:
        return self.target.label

    @property
    def memory_mb(self) -> int:
        return self.spec.memory

    @property
    def within_min(self) -> bool:
        return self.count <= self.spec.scale.min and not self.standby

    @property
    def protected(self) -> int:
        """Instances the budget must leave running: scale.min while it gets traffic."""
        return 0 if self.retired or self.standby else self.spec.scale.min

    def used_mb(self) -> int:
        """Every instance (running or starting) and the zygote, each at `memory:`."""
        return (self.count + self.zygote_alive) * self.spec.memory

    def reserve_mb(self) -> int:
        """What it still needs to reach scale.min (its zygote included)."""
        if self.count >= self.protected:
            return 0
        return (self.protected - self.count + (not self.zygote_alive)) * self.spec.memory

    def evictions(self, asking: bool) -> list[Eviction]:
        """Idle instances above scale.min, then the zygote once everything in it may go;
        nothing of the asking revision (it would only start them again)."""
        if asking:
            return []
        may_go = self.count - self.protected
        idle = self._idle_oldest_first()
        offers = [
            Eviction(
                i.idle_since,
                False,
                self.spec.memory,
                f"an instance of {self.label}",
                functools.partial(self._evict_instance, i),
            )
            for i in idle[: max(0, may_go)]
        ]
        zygote = self.zygote
        if (
            zygote is not None
            and zygote.ready.done()
            and not zygote.dead
            and not self.starting
            and not self.demand
            and len(idle) == self.count  # everything in it is idle
            and may_go >= self.count  # and may go
        ):
            offers.append(
                Eviction(
                    zygote.last_used,
                    True,
                    self.spec.memory,
                    f"the zygote of {self.label}",
                    self._evict_zygote,
                )
            )
        return offers

    def _evict_instance(self, inst: Instance) -> bool:
        if inst.busy or inst.dead:
            return False
        inst.stop()
        self.forget(inst)
        return True

    def _evict_zygote(self) -> bool:
        if self.instances or self.zygote is None:
            return False  # its instances are not all gone yet
        self.release_zygote()
        return True

    def statistics(self) -> RevisionStats:
        busy = sum(1 for i in self.instances.values() if i.busy)
        if self.zygote is None or self.zygote.dead:
            zstate = "none"
        else:
            zstate = "ready" if self.zygote.ready.done() else "starting"
        return RevisionStats(
            function=self.target.qualified,
            revision=self.target.number,
            idle=len(self.instances) - busy,
            busy=busy,
            starting=self.starting,
            waiting=len(self.waiters),
            zygote=zstate,
            retired=self.retired,
            starts=dict(self.starts),
            zygote_pid=self.zygote.pid if self.zygote is not None else 0,
            memory_mb=self.spec.memory,
            desired=self.window.last.desired,
            panic=self.window.last.panic,
            concurrency=round(self.window.last.stable, 3),
        )

    def stop(self) -> None:
        for inst in list(self.instances.values()):
            inst.kill()
        if self.zygote is not None:
            self.zygote.stop()
            self.zygote = None


def _expire(fut: asyncio.Future[Instance | None], function: str, scale_max: int) -> None:
    if not fut.done():
        fut.set_exception(
            FunctionTimeout(
                f"function '{function}': the request's deadline passed while it was waiting for "
                f"a free instance (all {scale_max} busy at scale.max); it never ran. Raise "
                "scale.max or timeout: in ember.yaml"
            )
        )
