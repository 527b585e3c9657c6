"""The node's pool: a RevisionPool per revision, the root zygote, quotas, the keep-alive loop.

`Pool` is the `PoolHost` of every `RevisionPool`; the parts it is made of own their state:
`Activity` (each function's idle times), `Placement` (cgroups, on a worker thread),
`Spares` (the pre-placed spare zygote), `MemoryBudget` (the node's memory), `Usage` (what
idle processes really use, measured on a thread of its own) and `Deadlines` (when each
revision's keep-alive step is next due).

The keep-alive tick steps only the revisions that are due: a busy one every `STEP` seconds
(the autoscaler samples its concurrency), a quiet one (`RevisionPool.quiet`: nothing to
sample, start or stop) at the next moment its zygote's keep-alive answer can change, or when
something happens to it (a request starts or ends, an instance is lost, `ember scale`, a
route change, its zygote or spare changes). So a tick's cost follows the busy revisions, not
the number of functions deployed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import psutil

from ember.autoscaler.histogram import Windows
from ember.autoscaler.keepalive import Action, next_edges, zygote_action
from ember.config import ServerConfig
from ember.errors import IsolationUnavailable, QuotaReached
from ember.pool.activity import Activity
from ember.pool.budget import KB, MemoryBudget
from ember.pool.capabilities import Check, SandboxProbe, missing, probe_sandbox, protections
from ember.pool.cgroup import Cgroups
from ember.pool.deadlines import Deadlines
from ember.pool.host import NodeStats, PoolSettings, RevisionStats
from ember.pool.instance import Instance
from ember.pool.layer_zygotes import LayerZygotes
from ember.pool.placement import MemoryVerdict, Placement
from ember.pool.quotas import check_quota
from ember.pool.revision import RevisionPool
from ember.pool.root import RootZygote
from ember.pool.spares import Spares
from ember.pool.target import RevisionKey, Target
from ember.pool.usage import Usage
from ember.pool.zygote import FunctionZygote
from ember.pool.zygotes import ZygoteStarter
from ember.spec import Quota
from ember.telemetry.buffer import TelemetryBuffer
from ember.telemetry.records import LogRecord
from ember.wire.messages import Invoke, Log, Result, ZygoteReady

log = logging.getLogger("ember.pool")
TICK = 0.25  # seconds between two runs of the keep-alive loop
STEP = 0.25  # seconds between two keep-alive steps of a revision that is not quiet
INSTANCE_STREAMS = frozenset({"stdout", "stderr", "log"})  # `system` lines are Ember's alone


class InstanceCounts(NamedTuple):
    """What /metrics reads of a revision (telemetry/metrics.py `RevisionCounts`)."""

    function: str  # "namespace/name"
    idle: int
    busy: int
    starting: int
    waiting: int


def _default_budget_mb() -> int:
    """80 % of the machine's memory."""
    return int(psutil.virtual_memory().total * 0.8) // (1024 * 1024)


class Pool:
    def __init__(self, config: ServerConfig, telemetry: TelemetryBuffer) -> None:
        self.config = config
        self.telemetry = telemetry
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # before the server raises it
        self.root = RootZygote(dict(config.base_env), nofile)
        self.settings = PoolSettings(config.queue_depth, config.init_timeout)
        self.due: Deadlines[RevisionKey] = Deadlines()  # each revision's next keep-alive step
        self._of_function: dict[str, set[RevisionKey]] = {}  # "namespace/name" -> revisions
        self._of_namespace: dict[str, set[RevisionKey]] = {}
        self.revisions: dict[RevisionKey, RevisionPool] = {}
        self._live: set[RevisionKey] = set()
        self._live_of: dict[str, set[RevisionKey]] = {}  # _live by "namespace/name"
        self._standby: set[RevisionKey] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self.placement = Placement(None)
        self.spares = Spares(self.root, self.placement)
        self.layers = LayerZygotes(
            config.layer_zygotes,
            config.layer_zygote_keepalive,
            lambda: self.budget.account(self.layers),
            lambda: self.usage.measure(self.layers, time.monotonic()),
        )
        self.zygotes = ZygoteStarter(
            config,
            self.root,
            self.placement,
            self.spares,
            self.layers,
            self._room_for_layer,
            self.system_log,
        )
        self.activity_of = Activity(config.zygote_keepalive)
        self.sandboxed = False
        self.probe = SandboxProbe("off")
        self.protections: list[Check] = []
        self.quotas: dict[str, Quota] = {}
        self._failing: set[RevisionKey] = set()  # revisions whose keep-alive step raised
        self.budget = MemoryBudget(
            config.memory_budget_mb or _default_budget_mb(),
            config.budget_wait,
            lambda: [*(rp.occupancy for rp in self.revisions.values()), self.layers],
        )
        self.usage = Usage()  # on a thread of its own, not behind or ahead of cgroup work

    @property
    def cgroups(self) -> Cgroups | None:
        return self.placement.cgroups

    async def start(self) -> None:
        if self.config.use_cgroups:
            self.placement.cgroups = Cgroups.detect(f"server-{os.getpid()}")
        self.probe = await asyncio.to_thread(
            probe_sandbox, self.config.run_dir / "probe", self.config.sandbox, self.config.base_env
        )
        self.sandboxed = self.probe.mode in ("root", "userns")
        self.zygotes.probe = self.probe
        if self.config.sandbox == "userns" and not self.sandboxed:
            raise IsolationUnavailable(f"--sandbox userns: {self.probe.detail}")
        self.protections = protections(self.cgroups, self.probe, self.config.use_cgroups)
        for check in self.protections:
            log.log(
                logging.INFO if check.ok else logging.WARNING, "%s: %s", check.name, check.detail
            )
        lacking = missing(self.protections)
        if self.config.require_isolation and lacking:
            if self.cgroups is not None:
                self.cgroups.cleanup()
            raise IsolationUnavailable(
                f"--require-isolation: this host does not give functions {', '.join(lacking)}; "
                "run `ember doctor` to see why (usually: run as root on Linux with cgroups)"
            )
        if self.sandboxed:
            self.config.sandbox_root.mkdir(parents=True, exist_ok=True)
        await self.root.ensure()
        self._loop_task = asyncio.get_running_loop().create_task(self._keepalive_loop())
        self.spares.enabled = self.cgroups is not None and self.probe.mode == "root"
        self.spares.replenish()

    # ---- revisions ----
    def open_revision(self, target: Target) -> RevisionPool:
        """The pool of a revision, made on first use. Only the control plane decides what is
        live: a request that still holds an old target is served, but does not bring its
        revision back to life."""
        rp = self.revisions.get(target.key)
        if rp is None:
            rp = self.revisions[target.key] = RevisionPool(target, self, self.settings)
            rp.retired = target.key not in self._live
            rp.standby = target.key in self._standby
            self._of_function.setdefault(target.qualified, set()).add(target.key)
            self._of_namespace.setdefault(target.namespace, set()).add(target.key)
            self.due.wake(target.key)
        return rp

    def _remove(self, key: RevisionKey) -> RevisionPool | None:
        """Forget a revision's pool everywhere (the caller stops it)."""
        rp = self.revisions.pop(key, None)
        if rp is None:
            return None
        self.due.discard(key)
        self.usage.forget(rp.occupancy)
        self.budget.leave(rp.occupancy)
        self._failing.discard(key)
        for index, name in ((self._of_function, rp.target.qualified), (self._of_namespace, key[0])):
            keys = index.get(name)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[name]
        return rp

    def retire_all_but(
        self, live: Iterable[RevisionKey], standby: Iterable[RevisionKey] = ()
    ) -> None:
        """`live`: what routes point at; of those, `standby` are reachable only through an
        alias without traffic weight (they keep no scale.min, get no pre-warm and no
        reserved memory)."""
        self._live = set(live)
        self._standby = set(standby)
        self._live_of = {}
        for key in self._live:
            self._live_of.setdefault(f"{key[0]}/{key[1]}", set()).add(key)
        for key, rp in self.revisions.items():
            self._mark(key, rp)

    def serve_functions(self, routed: dict[str, tuple[list[Target], list[Target]]]) -> None:
        """As `serve`, for some functions ("namespace/name") only: each gets its `serving`
        targets and `standby` ones ([] and []: none, it is gone); the other functions' stay
        as they were. A deploy's publish costs the same at any number of functions."""
        for function, (serving, standby) in routed.items():
            serving_keys = {t.key for t in serving}
            standby_keys = {t.key for t in standby} - serving_keys
            live = serving_keys | standby_keys
            before = self._live_of.pop(function, set())  # with what a deploy prepared
            self._live -= before
            self._standby -= before
            self._live |= live
            self._standby |= standby_keys
            if live:
                self._live_of[function] = live
            for key in before | live:
                rp = self.revisions.get(key)
                if rp is not None:
                    self._mark(key, rp)
            for target in serving:
                if target.spec.scale.min > 0:
                    self.open_revision(target)

    def _mark(self, key: RevisionKey, rp: RevisionPool) -> None:
        """Retired or standby as the routes now say."""
        retired, standby_now = key not in self._live, key in self._standby
        if (retired, standby_now) != (rp.retired, rp.standby):
            rp.retired, rp.standby = retired, standby_now
            self.budget.account(rp.occupancy)  # what it keeps for scale.min changed
            self.due.wake(key)

    def serve(self, serving: Iterable[Target], standby: Iterable[Target]) -> None:
        """The control plane published routes: `serving` targets get traffic, `standby` ones
        only through an alias. Revisions that keep scale.min instances get a pool now, so
        their instances start without waiting for a first request (e.g. after a restart)."""
        serving = list(serving)
        serving_keys = {t.key for t in serving}
        standby_keys = {t.key for t in standby}
        self.retire_all_but(serving_keys | standby_keys, standby_keys - serving_keys)
        for target in serving:
            if target.spec.scale.min > 0:
                self.open_revision(target)

    async def prepare(self, target: Target) -> ZygoteReady:
        """Start the revision's zygote (import + init); raises DeployRejected on failure."""
        self._live.add(target.key)  # about to be published: keep-alive must not reap it
        self._live_of.setdefault(target.qualified, set()).add(target.key)
        rp = self.open_revision(target)
        rp.retired = False
        rp.warmed_at = time.monotonic()  # keep-alive keeps what a deploy or rollback warmed
        self.due.wake(target.key)
        try:
            await rp.ensure_zygote()
        except BaseException:
            self.discard(target)
            raise
        assert rp.zygote is not None
        return rp.zygote.ready.result()

    async def run_once(self, target: Target, msg: Invoke) -> tuple[Result, str, Instance]:
        """One call to a revision `prepare` started (Ember's own work in a namespace's
        sandbox: a build), within its timeout; the caller discards the revision after."""
        rp = self.open_revision(target)
        return await rp.invoke(msg, asyncio.get_running_loop().time() + target.spec.timeout)

    def discard(self, target: Target) -> None:
        self._live.discard(target.key)
        keys = self._live_of.get(target.qualified)
        if keys is not None:
            keys.discard(target.key)
            if not keys:
                del self._live_of[target.qualified]
        rp = self._remove(target.key)
        if rp is not None:
            rp.stop()
            self.placement.forget_zygote_dirs(target.key)

    def forget_function(self, function: str) -> None:
        """`ember rm`: nothing of the function ("namespace/name") stays; its revisions,
        retired by the routes, drain and are reaped by the keep-alive loop, which forgets
        what their last requests recorded."""
        self.activity_of.forget(function)

    async def scale(self, target: Target, instances: int) -> int:
        return await self.open_revision(target).hold_scale(instances)

    # ---- quotas ----
    def set_quotas(self, quotas: dict[str, Quota]) -> None:
        self.quotas = dict(quotas)

    def check_quota(self, target: Target) -> None:
        """Raise 429 when one more instance of `target` would exceed its namespace's quota
        (pool/quotas.py); only the namespace's revisions are counted."""
        quota = self.quotas.get(target.namespace)
        if quota is None or not (quota.instances or quota.memory_mb):
            return  # no list of the namespace's revisions per start (1,000 in `default`)
        mine = [self.revisions[key] for key in self._of_namespace.get(target.namespace, ())]
        try:
            check_quota(quota, target, mine, self.layers.declared_mb(target.namespace))
        except QuotaReached:  # idle layer zygotes give way to the namespace's instances
            if not self.layers.evict_idle(target.namespace):
                raise
            check_quota(quota, target, mine, self.layers.declared_mb(target.namespace))

    # ---- layer zygotes (layer_zygotes.py) ----
    def _room_for_layer(self, target: Target) -> bool:
        """A layer zygote only uses free memory and quota: it never evicts, waits or refuses."""
        self.layers.memory_mb = target.spec.memory
        if not self.budget.fits(self.layers, target.spec.memory * KB):
            return False
        quota = self.quotas.get(target.namespace)
        if quota is None or not quota.memory_mb:
            return True
        mine = [self.revisions[key] for key in self._of_namespace.get(target.namespace, ())]
        used = sum(rp.occupancy.declared_mb() for rp in mine)
        used += self.layers.declared_mb(target.namespace)
        return used + 3 * target.spec.memory <= quota.memory_mb  # it, the zygote, an instance

    # ---- the memory budget, for revision pools ----
    async def make_room(self, rp: RevisionPool, loop_deadline: float | None) -> None:
        await self.budget.make_room(rp.occupancy, loop_deadline)

    def check_prewarm(self, rp: RevisionPool) -> None:
        self.budget.check_prewarm(rp.occupancy)

    def freed(self) -> None:
        self.budget.freed()

    def account(self, rp: RevisionPool) -> None:
        if self.revisions.get(rp.target.key) is rp:  # not one discarded meanwhile
            self.budget.account(rp.occupancy)

    def spare_fits(self, rp: RevisionPool, kb: int) -> bool:
        return self.budget.fits(rp.occupancy, kb)

    def rested(self, rp: RevisionPool) -> None:
        if self.revisions.get(rp.target.key) is rp:
            self.usage.measure(rp.occupancy, time.monotonic())

    def wake(self, rp: RevisionPool) -> None:
        if self.revisions.get(rp.target.key) is rp:
            self.due.wake(rp.target.key)

    # ---- zygotes ----
    async def start_zygote(self, target: Target) -> tuple[FunctionZygote, bool]:
        """A new zygote for `target` (its import under way); True if the root zygote had to
        be (re)started for it (pool/zygotes.py)."""
        return await self.zygotes.start(target)

    # ---- cgroups, for revision pools ----
    def rlimit_for(self, memory_mb: int) -> int:
        return self.placement.rlimit_for(memory_mb)

    def place(self, inst: Instance, zygote_dir: str, memory_mb: int) -> None:
        self.placement.place(inst, zygote_dir, memory_mb)

    async def verdict(self, procs: str) -> MemoryVerdict:
        return await self.placement.verdict(procs)

    def release_cgroup(self, procs: str) -> None:
        self.placement.release(procs)

    # ---- logs ----
    def instance_log(self, target: Target, instance: str, msg: Log) -> None:
        """A line from an instance; it runs the function's code, so it cannot claim to be a
        line of Ember's own (`system`): such a line is kept as stderr."""
        self.telemetry.log(
            LogRecord(
                ts=msg.ts,
                function=target.qualified,
                revision=target.number,
                request_id=msg.id,
                instance=instance,
                stream=msg.stream if msg.stream in INSTANCE_STREAMS else "stderr",
                message=msg.data,
            )
        )

    def system_log(self, target: Target, text: str) -> None:
        self.telemetry.log(
            LogRecord(
                ts=time.time(),
                function=target.qualified,
                revision=target.number,
                request_id="",
                instance="",
                stream="system",
                message=text,
            )
        )

    # ---- activity and keep-alive ----
    def activity(self, target: Target, busy: bool, now: float) -> None:
        """A revision of the function got its first request in flight, or its last one done;
        the function's idle times (end of activity to the next request) feed its histogram.
        The revision is stepped at the next tick; when the function as a whole turned busy or
        idle (its zygotes' keep-alive answer depends on it), all its revisions are."""
        fn = target.qualified
        self.due.wake(target.key)
        if self.activity_of.record(fn, busy, now):
            for key in self._of_function.get(fn, ()):
                self.due.wake(key)
        rp = self.revisions.get(target.key)
        if not busy and rp is not None:
            self.usage.measure(rp.occupancy, now)

    def set_backlog(self, target: Target, due: int) -> None:
        """Async invocations of `target`'s function waiting to run on it: the autoscaler
        counts them as demand (ember.queue.dispatcher sets this every second)."""
        rp = self.revisions.get(target.key)
        if rp is not None and rp.backlog != due:
            rp.backlog = due
            self.due.wake(target.key)

    def keepalive_windows(self, function: str) -> Windows:
        return self.activity_of.windows(function)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self.tick(time.monotonic())
            except Exception:  # a bug here must not end keep-alive for every function
                log.exception("keep-alive tick failed")

    def tick(self, now: float) -> None:
        """A keep-alive step for each revision that is due, each on its own: one that raises
        is logged (once, until it recovers) and stepped again next time; the others, the
        memory measurements and the cgroup sweep go on."""
        for key in self.due.due(now):
            rp = self.revisions.get(key)
            if rp is None:
                continue
            try:
                after = self._step(key, rp, now)
            except Exception:
                after = now + STEP
                if key not in self._failing:
                    self._failing.add(key)
                    log.exception("keep-alive of %s failed; it is retried every tick", rp.label)
            else:
                self._failing.discard(key)
            if after is not None and key in self.revisions:
                self.due.at(key, after)
        self.layers.tick(now, self._live_of.__contains__)
        self.usage.tick(now)
        self.placement.sweep()

    def _step(self, key: RevisionKey, rp: RevisionPool, now: float) -> float | None:
        """One revision's keep-alive step; when it is due again (None: at its next event)."""
        if rp.retired:
            rp.drain()
            idle = not rp.instances and not rp.zygote_alive and not rp.starting
            if idle and not rp.demand and not rp.waiters:
                rp.stop()
                self._remove(key)
                self.placement.forget_zygote_dirs(key)
                if rp.target.qualified not in self._live_of:  # the function is gone
                    self.activity_of.forget(rp.target.qualified)
                return None
            return now + STEP
        rp.autoscale(now, STEP)
        zygote_due = self._keep_zygote(rp, now)
        spare_due = rp.keep_spare(now)
        self.budget.account(rp.occupancy)
        rp.asleep = rp.quiet(now)
        edges = [t for t in (zygote_due, spare_due) if t is not None]
        if not rp.asleep:
            resting = _resting_until(rp, now)
            if resting is None:  # sampled every STEP, and at its keep-alive edges on time
                edges.append(now + STEP)
            else:  # nothing to decide before then: it sleeps (its zero samples are filled in)
                rp.asleep = True
                edges.append(resting)
        return min(edges, default=None)

    def _keep_zygote(self, rp: RevisionPool, now: float) -> float | None:
        """Load, keep or release the zygote as `zygote_action` says; when its answer can next
        change without any event (None: not before one)."""
        fn = rp.target.qualified
        in_use = bool(rp.count or rp.demand or rp.waiters)
        in_use = in_use or (self.activity_of.busy(fn) and not rp.standby)  # its traffic is on
        warmed_until = rp.warmed_at + self.config.zygote_keepalive
        in_use = in_use or now < warmed_until
        ended = self.activity_of.idle_since(fn)
        if ended is None and rp.zygote is not None and not rp.zygote.dead:
            ended = rp.zygote.last_used  # deployed (probed) but not used since the server began
        idle_for = None if ended is None else now - ended
        w = self.keepalive_windows(fn)
        action = zygote_action(w, rp.zygote_alive, in_use, idle_for)
        if action is Action.RELEASE and rp.zygote is not None and rp.zygote.ready.done():
            rp.release_zygote()
        elif action is Action.PREWARM and now >= rp.backoff_until and not rp.standby:
            rp.prewarm()
        edges = [warmed_until] if now < warmed_until else []
        if action is Action.PREWARM and now < rp.backoff_until:
            edges.append(rp.backoff_until)
        if ended is not None and idle_for is not None:
            edges += [ended + t for t in next_edges(w, idle_for)]
        return min(edges, default=None)

    def statistics(self) -> list[RevisionStats]:
        return [rp.statistics() for rp in self.revisions.values()]

    def instance_counts(self) -> Iterator[InstanceCounts]:
        """Instances by state per revision, for /metrics on the event loop: ~1 µs a revision,
        where `statistics()` builds a RevisionStats each (9-22 ms a scrape at 1,000). Counted
        as they are read, so a scrape that pauses between revisions pauses the count too."""
        for rp in list(self.revisions.values()):
            instances = rp.instances
            busy = sum(1 for i in instances.values() if i.busy) if instances else 0
            yield InstanceCounts(
                rp.target.qualified, len(instances) - busy, busy, rp.starting, len(rp.waiters)
            )

    def node_statistics(self) -> NodeStats:
        return NodeStats(
            revisions=len(self.revisions),
            functions_tracked=len(self.activity_of),
            cgroups_pending=self.placement.pending,
            memory_used_mb=self.budget.used_mb(),
            memory_budget_mb=self.budget.mb,
        )

    async def shutdown(self) -> None:
        await self.spares.shutdown()
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        for rp in self.revisions.values():
            rp.stop()
        self.layers.stop_all()
        await self.usage.shutdown()
        await self.root.stop()
        self.placement.shutdown()
        if self.cgroups is not None:
            deadline = time.monotonic() + 2.0  # killed instances take a moment to leave
            while not self.cgroups.cleanup() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)


def _resting_until(rp: RevisionPool, now: float) -> float | None:
    """When a revision at rest within its idle grace must be stepped again (None: it must be
    stepped every STEP): nothing in flight, waiting or starting, and the autoscaler keeps what
    runs, at most one instance or its scale.min. With only zero samples to come its means can
    only fall, so its answer stays until the grace ends (scale to scale.min) or `ember scale`'s
    hold does; a request, a lost instance or a change to its zygote or spare wakes it before.
    Without this every function called within its idle grace (10 minutes for many) was
    stepped four times a second: at 1,000 functions ~40 % of the event loop."""
    if rp.demand or rp.waiters or rp.starting or rp.slot.starting or rp.spare.pending:
        return None
    last, window = rp.window.last, rp.window
    if last.panic or last.desired != rp.count or rp.count > max(rp.protected, 1):
        return None
    edges = [window.last_active + rp.spec.scale.idle]
    if now < window.held_until:
        edges.append(window.held_until)
    due = min(edges)
    return due if due > now else None
