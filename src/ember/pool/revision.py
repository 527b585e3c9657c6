"""One revision's pool: idle instances, a FIFO of waiting requests, starts within `scale.max`.

A `RevisionPool` talks to the node's pool only through `PoolHost`, the few things it needs
from it (quotas, the memory budget, zygotes from the root, cgroup placement, logs, its own
keep-alive schedule), and offers the memory budget its idle instances and zygote as
`Eviction`s rather than being edited. Its zygote keeps a spare instance (`prefork.py`), so a
start from zero is a hand-off (tier `spare`) rather than a fork.

Start tiers, as `X-Ember-Start` names them (host.py): `warm` (an idle instance), `spare` (the
spare instance handed over), `fork` (forked from the warm zygote), `specialize` (a new zygote
first), `fresh` (the root zygote too). The zygote itself is held by a `ZygoteSlot`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import msgspec

from ember.autoscaler.scaler import Decision, Window, decide
from ember.errors import DeployRejected, EmberError, FunctionError, PlatformError
from ember.pool import failures
from ember.pool.budget import KB
from ember.pool.call import SWEEP, Awaited, Call, State
from ember.pool.host import SPARE, TIERS, WARM, PoolHost, PoolSettings, RevisionStats
from ember.pool.instance import Instance
from ember.pool.occupancy import Occupancy
from ember.pool.prefork import SpareInstance
from ember.pool.target import Target
from ember.pool.zygote import FunctionZygote
from ember.pool.zygote_slot import ZygoteSlot
from ember.wire.messages import Invoke, Log, Result

log = logging.getLogger("ember.pool")


class RevisionPool:
    def __init__(self, target: Target, host: PoolHost, settings: PoolSettings) -> None:
        self.target = target
        self.spec = target.spec
        self.host = host
        self.settings = settings
        self.instances: dict[str, Instance] = {}
        self.idle: list[Instance] = []
        self.waiters: deque[Call] = deque()  # for a free instance, or room to start one
        self.calls: set[Call] = set()  # submitted and not settled: their deadlines are swept
        self._sweeping = False
        self.starting = 0
        self.slot = ZygoteSlot(
            target, host.start_zygote, host.system_log, settings.init_timeout, self._zygote_changed
        )
        self.retired = False
        self.standby = False  # reachable only through an alias without traffic weight
        self.warmed_at = -math.inf  # when a deploy, rollback or traffic change started it
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures = 0  # keep-warm starts that failed in a row
        self.backoff_until = 0.0
        self.starts = dict.fromkeys(TIERS, 0)
        self.spare = SpareInstance(self._fork, self._spare_changed, target.label)
        self.spare_wanted = False  # scaled to its floor after idleness: a spare stands in
        self.occupancy = Occupancy(self, self._account)  # as the memory budget sees it
        # Concurrency for the autoscaler: requests in flight or waiting, integrated over time.
        self.demand = 0
        self._area = 0.0
        self._mark = self._sampled = time.monotonic()
        self.window = Window(self.spec.scale.window)
        self.asleep = False  # quiet at its last step: the pool stopped stepping it until woken
        # Async invocations of the function that are due and could run here now (its queue
        # depth within its async concurrency, set by ember.queue.dispatcher): demand the
        # autoscaler counts beside the calls in flight.
        self.backlog = 0

    # ---- the hot path (call.py) ----
    def submit(self, call: Call) -> None:
        """Serve a call: an idle instance takes it at once; otherwise a start (a task, for the
        start alone) or a place in the queue. Its caller hears of its end."""
        self._load(1)
        self.calls.add(call)
        if not self._sweeping:
            self._sweeping = True
            asyncio.get_running_loop().call_later(SWEEP, self._sweep)
        self._dispatch(call)

    async def invoke(
        self, msg: Invoke, loop_deadline: float, caller_deadline: bool = False
    ) -> tuple[Result, str, Instance]:
        """`submit()` for code that awaits the result. `caller_deadline`: the deadline is the
        caller's (X-Ember-Timeout), shorter than the function's timeout; when it passes, only
        this request ends."""
        awaited = Awaited(asyncio.get_running_loop())
        self.submit(Call(msg, loop_deadline, awaited, caller_deadline))
        return await awaited.future

    def has_room(self) -> bool:
        """Whether a call submitted now runs at once (an idle instance, or a start within
        scale.max) and no synchronous call waits: async work takes only free capacity."""
        if self.waiters:
            return False
        if self.count < self.spec.scale.max:
            return True
        return any(inst.has_room and not inst.dead for inst in self.idle)

    def _dispatch(self, call: Call) -> None:
        inst = self._take_idle()
        if inst is not None:
            self._send(call, inst, WARM)
        elif self.count < self.spec.scale.max:
            try:
                self.host.check_quota(self.target)  # the namespace's quotas (429 naming one)
            except EmberError as exc:
                self.settle(call, None, exc)
                return
            call.state = State.STARTING
            self.starting += 1  # counts within scale.max at once, before the task runs
            self._background(self._start_call(call))
        elif len(self.waiters) >= self.settings.queue_depth:
            full = failures.queue_full(self.target.function, self.spec.scale.max, len(self.waiters))
            self.settle(call, None, full)
        else:
            call.state = State.WAITING
            self.waiters.append(call)

    def _send(self, call: Call, inst: Instance, tier: str) -> None:
        if inst.dead:  # died between the hand-off and now: take another
            inst.reserved -= 1
            self._dispatch(call)
            return
        call.state, call.inst, call.tier = State.RUNNING, inst, tier
        inst.call(call)

    async def _start_call(self, call: Call) -> None:
        """A start bounded by the request's deadline; init failures are the function's (502)."""
        try:
            async with asyncio.timeout_at(call.deadline):
                inst, tier = await self._start(call.deadline, counted=True)
        except TimeoutError:
            timed_out = failures.start_timed_out(self.target.function, self.spec.timeout)
            self.settle(call, None, timed_out)
        except DeployRejected as exc:
            error = FunctionError(exc.message, code="init_failed", detail=exc.detail)
            for waiter in list(self.waiters):  # they would only import the same module again
                self.waiters.remove(waiter)
                self.settle(waiter, None, error)
            self.settle(call, None, error)
        except asyncio.CancelledError:  # the server is stopping
            self.settle(call, None, PlatformError("the server stopped before the request ran"))
            raise
        except Exception as exc:  # EmberErrors (quota, memory) and our own bugs alike
            self.settle(call, None, exc)
        else:
            self._send(call, inst, tier)

    def settle(self, call: Call, result: Result | None, error: BaseException | None) -> None:
        """The call's end (a result, or an error): its instance back to the pool, its caller
        told. Once: a second settle (a result racing its deadline) is ignored."""
        if call.state is State.DONE:
            return
        running = call.state is State.RUNNING
        call.state = State.DONE
        self.calls.discard(call)
        if running:  # first: a request the answer lets in (pipelined) may take it at once
            assert call.inst is not None
            self.release(call.inst)
        try:
            if error is None:
                assert result is not None and call.inst is not None
                self.starts[call.tier] += 1
                if call.tier == SPARE:
                    self.spare.succeeded()
                call.caller.resolved(result, call.tier, call.inst)
            else:
                call.caller.failed(error)
        except Exception:  # the caller's bug must not break the instance's protocol
            log.exception("answering request %s of %s failed", call.msg.id, self.target.label)
        # After the answer: when this was the last call in flight, the revision turning idle
        # (activity, the budget's count, a memory measurement) is not on the caller's path.
        self._load(-1)

    def _sweep(self) -> None:
        """End what is past its deadline: a waiting call (it never ran) or a running one (its
        instance is killed, unless the deadline was the caller's and others share it)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for call in [c for c in self.calls if c.deadline <= now]:
            if call.state is State.WAITING:
                self.waiters.remove(call)
                expired = failures.waited_too_long(self.target.function, self.spec.scale.max)
                self.settle(call, None, expired)
            elif call.state is State.RUNNING:
                self._timed_out(call)
        self._sweeping = bool(self.calls)
        if self._sweeping:
            loop.call_later(SWEEP, self._sweep)

    def _timed_out(self, call: Call) -> None:
        inst = call.inst
        assert inst is not None
        inst.inflight.pop(call.msg.id, None)
        name = self.target.function
        if not (call.own_deadline and inst.concurrency > 1):  # else others run on it: they
            inst.kill(failures.killed_beside(name))  # keep their deadlines; its answer is dropped
        self.settle(call, None, failures.ran_too_long(name, self.spec.timeout, call.own_deadline))

    def _load(self, delta: int) -> None:
        now = time.monotonic()
        self._area += self.demand * (now - self._mark)
        self._mark = now
        was_idle = self.demand == 0
        self.demand += delta
        if was_idle and delta > 0:
            self.host.activity(self.target, busy=True, now=now)
            self._account()  # its idle instances count at their cap again
        elif self.demand == 0:
            self.host.activity(self.target, busy=False, now=now)  # at rest: measured soon
            self._account()  # its idle instances count as last measured (plus their growth)

    @property
    def count(self) -> int:
        return len(self.instances) + self.starting

    def _take_idle(self) -> Instance | None:
        idle = self.idle
        while idle:
            inst = idle[-1]
            room = inst.concurrency - len(inst.inflight) - inst.reserved  # `has_room`, inline
            if inst.dead or room <= 0:
                idle.pop()
                inst.listed = False
                continue
            inst.reserved += 1
            if room == 1:
                idle.pop()
                inst.listed = False
            return inst
        return None

    def release(self, inst: Instance) -> None:
        if not inst.has_room:
            return
        while self.waiters and inst.has_room:
            inst.reserved += 1
            self._send(self.waiters.popleft(), inst, WARM)
        if inst.has_room and not inst.listed:
            self.idle.append(inst)
            inst.listed = True
        if not inst.busy:
            inst.idle_since = time.monotonic()

    # ---- starting instances ----
    @property
    def zygote(self) -> FunctionZygote | None:
        return self.slot.zygote

    @property
    def zygote_alive(self) -> bool:
        """A zygote runs or is being started (it counts against memory from the start)."""
        return self.slot.alive

    async def _start(
        self, loop_deadline: float | None, counted: bool = False
    ) -> tuple[Instance, str]:
        """`counted`: the caller checked the quotas and counted it in `starting` already."""
        if not counted:
            self.host.check_quota(self.target)  # the namespace's quotas (429 naming the one)
            self.starting += 1  # holds its place within scale.max (and its memory) from here
        try:
            await self.host.make_room(self, loop_deadline)  # the node's memory budget
            inst, tier = await self._new_instance()
        except BaseException:
            self.starting -= 1
            self._account()
            self._wake_waiter()  # the room this start held is free again
            self.host.freed()
            raise
        self.starting -= 1
        inst.reserved += 1
        inst.settle = self.settle
        self.instances[inst.id] = inst
        self._account()
        self.release(inst)  # room beyond this request (concurrency > 1): waiters, idle list
        return inst, tier

    async def _new_instance(self) -> tuple[Instance, str]:
        """The spare if the zygote has one (a hand-off), else a fork (a new zygote first if
        there is none)."""
        zygote = self.ready_zygote()
        if zygote is not None:
            spare = await self.spare.take(zygote)
            if spare is not None:
                self.spare_wanted = False  # it is an instance now, until the next scale-down
                return spare, SPARE
        tier = await self.ensure_zygote()
        assert self.zygote is not None
        try:
            return await self._fork(self.zygote), tier
        except PlatformError:  # it died and we have not read its EOF yet: one new zygote
            self.zygote.stop()
            tier = await self.ensure_zygote()
            assert self.zygote is not None
            return await self._fork(self.zygote), tier

    def ready_zygote(self) -> FunctionZygote | None:
        return self.slot.ready()

    def _wake_waiter(self) -> None:
        if self.waiters and self.count < self.spec.scale.max:
            self._dispatch(self.waiters.popleft())  # room for one more: a start for it

    async def _fork(self, zygote: FunctionZygote) -> Instance:
        iid = f"{self.target.function}-{self.target.number}-{secrets.token_hex(3)}"
        inst = await zygote.fork(
            iid, self.host.rlimit_for(self.spec.memory), self._on_log, self._on_lost
        )
        self.host.place(inst, zygote.cgroup_dir, self.spec.memory)
        return inst

    async def ensure_zygote(self) -> str:
        """Have a ready zygote; the tier says what it took: fork, specialize or fresh."""
        return await self.slot.ensure()

    def _zygote_changed(self, ready: bool) -> None:
        if ready:
            self.host.rested(self)  # its memory is measured soon
        else:  # gone (or never ready): what it held counts no more
            self.spare_wanted = False
            self.spare.discard()
            self.host.wake(self)
        self._account()

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
        if not self.spare.lost(inst):
            self.forget(inst)
            self._wake_waiter()
        self._background(self._bury(inst))
        self.host.freed()
        self.host.wake(self)  # scale.min may want it back

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
            cause = failures.crash(self.target.function, self.spec.memory, verdict, status)
            inst.fail_all(inst.death or cause)
        inst.close_pidfd()
        self.host.release_cgroup(inst.cgroup)

    # ---- autoscaling, keep-alive, the spare ----
    def autoscale(self, now: float, step: float) -> Decision:
        """One step: sample the concurrency, ask the scaler, start or stop instances. `step`:
        the seconds between two steps while the revision is busy; a revision that slept since
        its last step (`asleep`, set by the pool when it was `quiet`) gets the zero samples
        the skipped steps would have taken."""
        if self.asleep:  # nothing ran while it slept: what did came within the last step
            self.window.idle_until(now, step)
            self._sampled = max(self._sampled, now - step)
            self.asleep = False
        self._area += self.demand * (now - self._mark)
        span = now - self._sampled
        mean = self._area / span if span > 0 else float(self.demand)
        self._area, self._mark, self._sampled = 0.0, now, now
        mean += self.backlog
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
            for inst in self.idle_oldest_first()[: self.count - desired]:
                inst.stop()
            if desired <= scale.min:  # back at its floor: the next start is from zero
                self.spare_wanted = True
        return decision

    def quiet(self, now: float) -> bool:
        """Nothing to sample, start or stop until something happens to it (a request, a lost
        instance, `ember scale`, a route change, its zygote or spare): it need not be stepped."""
        if self.demand or self.waiters or self.starting or self._tasks or self.spare.pending:
            return False
        if self.backlog:
            return False
        if self.slot.starting:
            return False
        if now < self.window.held_until or now - self.window.last_active < self.spec.scale.idle:
            return False
        return self.count == (0 if self.standby else self.spec.scale.min)

    def keep_spare(self, now: float) -> float | None:
        """Have a spare instance once the autoscaler took the revision back to its floor
        (until a start takes it), while its zygote is ready and it gets traffic; returns when
        to look again if it backs off (None: at the next event)."""
        zygote = self.ready_zygote()
        if self.window.held == 0 and now < self.window.held_until:  # ember scale 0
            self.spare_wanted = False
        if (
            zygote is None
            or not self.spare_wanted
            or self.retired
            or self.standby
            or not self.settings.spare_instances
        ):
            if self.spare.held:
                self.spare.discard()
                self._account()
            return None
        if self.spare.held:
            return None
        if now < self.spare.retry_at:
            return self.spare.retry_at
        need = zygote.measured_kb or self.spec.memory * KB  # what it counts until measured
        if not self.host.spare_fits(self, need):  # free memory only
            return self.spare.no_room(now)
        self.spare.replenish(zygote, now)
        return None

    def _spare_changed(self) -> None:
        self._account()
        self.host.rested(self)  # a new spare is measured soon
        self.host.wake(self)

    def idle_oldest_first(self) -> list[Instance]:
        """Instances with nothing to do, longest idle first: the first to stop or evict."""
        idle = [i for i in self.instances.values() if not i.busy and not i.dead]
        return sorted(idle, key=lambda i: i.idle_since)

    def drain(self) -> None:
        """A retired revision: stop what is idle; the zygote goes once nothing runs."""
        for inst in list(self.instances.values()):
            if not inst.busy:
                inst.stop()
        self.spare.discard()
        if not self.instances and not self.starting:
            self.slot.release()
        self._account()

    def release_zygote(self) -> None:
        self.spare_wanted = False
        self.spare.discard()
        if self.slot.release():
            self.host.freed()
        self._account()

    def forget(self, inst: Instance) -> None:
        """An instance being stopped no longer counts (its memory is on its way back)."""
        self.instances.pop(inst.id, None)
        if inst.listed:
            self.idle.remove(inst)
            inst.listed = False
        self._account()

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
        now; the autoscaler then holds exactly n for the idle grace before it decides again.
        Holding 0 frees the spare instance too (the zygote stays)."""
        n = min(n, self.spec.scale.max)
        self.window.held, self.window.held_until = n, time.monotonic() + self.spec.scale.idle
        for inst in self.idle_oldest_first()[: max(0, self.count - n)]:
            inst.stop()
        if n == 0:
            self.keep_spare(time.monotonic())
        extra = max(0, n - self.count)
        await asyncio.gather(*(self.warm_one() for _ in range(extra)))
        self.host.wake(self)
        return self.count

    # ---- what the memory budget reads (occupancy.py) ----
    @property
    def label(self) -> str:
        return self.target.label

    @property
    def protected(self) -> int:
        """Instances the budget must leave running: scale.min while it gets traffic."""
        return 0 if self.retired or self.standby else self.spec.scale.min

    @property
    def at_rest(self) -> bool:
        return not self.demand and not self.waiters

    def _account(self) -> None:
        self.host.account(self)

    def evict_instance(self, inst: Instance) -> bool:
        if inst.busy or inst.dead:
            return False
        inst.stop()
        self.forget(inst)
        return True

    def evict_zygote(self) -> bool:
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
            spare=int(self.spare.instance is not None),
            counted_kb=self.occupancy.counted_kb(),
        )

    def stop(self) -> None:
        self.spare.close()
        for inst in list(self.instances.values()):
            inst.kill()
        self.slot.release()
