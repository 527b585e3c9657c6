"""The node's pool: a RevisionPool per revision, the root zygote, cgroups, the keep-alive loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import msgspec
import psutil

from ember.autoscaler.histogram import IdleHistogram, Windows, windows
from ember.autoscaler.keepalive import Action, zygote_action
from ember.config import ServerConfig
from ember.errors import IsolationUnavailable, QuotaReached
from ember.pool.budget import MemoryBudget
from ember.pool.capabilities import Check, SandboxProbe, missing, probe_sandbox, protections
from ember.pool.cgroup import Cgroups
from ember.pool.instance import Instance
from ember.pool.revision import RevisionPool, RevisionStats
from ember.pool.root import RootZygote, spec_message
from ember.pool.target import RevisionKey, Target
from ember.pool.zygote import FunctionZygote
from ember.spec import Quota
from ember.telemetry.buffer import TelemetryBuffer
from ember.telemetry.records import LogRecord
from ember.wire.messages import Log, SandboxPlan, SpareReady, ZygoteMessage, ZygoteReady

log = logging.getLogger("ember.pool")
TICK = 0.25  # seconds between keep-alive decisions
# A new instance is charged to its zygote's cgroup until the server moves it into its own:
# the zygote's limit is `memory` plus this much per instance of `scale.max`, at most the cap.
PRE_MOVE_MB = 4
PRE_MOVE_CAP_MB = 256
_SPARE_DECODER = msgspec.msgpack.Decoder(ZygoteMessage)


def _default_budget_mb() -> int:
    """80 % of the machine's memory."""
    return int(psutil.virtual_memory().total * 0.8) // (1024 * 1024)


class Spare(NamedTuple):
    """A zygote-to-be in cgroups of its own, waiting to be given a function."""

    slug: str
    joins: list[str]
    sock: socket.socket


def _alive(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True  # nothing to read: still there
    except OSError:
        return False


class Pool:
    def __init__(self, config: ServerConfig, telemetry: TelemetryBuffer) -> None:
        self.config = config
        self.telemetry = telemetry
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # before the server raises it
        self.root = RootZygote(dict(config.base_env), nofile)
        self.cgroups: Cgroups | None = None
        self.revisions: dict[RevisionKey, RevisionPool] = {}
        self._live: set[RevisionKey] = set()
        self._standby: set[RevisionKey] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._mover = ThreadPoolExecutor(1, thread_name_prefix="ember-cgroup")
        self.sandboxed = False
        self.probe = SandboxProbe("off")
        self.protections: list[Check] = []
        self.quotas: dict[str, Quota] = {}
        self._unremoved: set[str] = set()  # revision cgroups that still had processes
        self._unremoved_leaves: set[str] = set()  # instance and zygote leaves, likewise
        self._zygote_dirs: dict[RevisionKey, list[str]] = {}  # cgroups of each zygote started
        self._spare: Spare | None = None
        self._spare_task: asyncio.Task[None] | None = None
        self._stopping = False
        # Zygote keep-alive: per function ("namespace/name"), its idle times and activity.
        self.histograms: dict[str, IdleHistogram] = {}
        self._busy: dict[str, int] = {}  # revisions of the function with requests now
        self._idle_since: dict[str, float] = {}  # end of the function's last activity
        # The node's memory budget (MB) and the starts waiting for some of it.
        self.budget = MemoryBudget(
            config.memory_budget_mb or _default_budget_mb(), config.budget_wait, self.revisions
        )

    async def start(self) -> None:
        if self.config.use_cgroups:
            self.cgroups = Cgroups.detect(f"server-{os.getpid()}")
        self.probe = await asyncio.to_thread(
            probe_sandbox, self.config.run_dir / "probe", self.config.sandbox, self.config.base_env
        )
        self.sandboxed = self.probe.mode in ("root", "userns")
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
        self._replenish()

    # ---- revisions ----
    def revision(self, target: Target) -> RevisionPool:
        """The pool of a revision. Only the control plane decides what is live: a request that
        still holds an old target is served, but does not bring its revision back to life."""
        rp = self.revisions.get(target.key)
        if rp is None:
            rp = self.revisions[target.key] = RevisionPool(target, self)
            rp.retired = target.key not in self._live
            rp.standby = target.key in self._standby
        return rp

    def retire_all_but(
        self, live: Iterable[RevisionKey], standby: Iterable[RevisionKey] = ()
    ) -> None:
        """`live`: what routes point at; of those, `standby` are reachable only through an
        alias without traffic weight (they keep no scale.min, get no pre-warm and no
        reserved memory)."""
        self._live = set(live)
        self._standby = set(standby)
        for key, rp in self.revisions.items():
            rp.retired = key not in self._live
            rp.standby = key in self._standby

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
                self.revision(target)

    async def prepare(self, target: Target) -> ZygoteReady:
        """Start the revision's zygote (import + init); raises DeployRejected on failure."""
        self._live.add(target.key)  # about to be published: keep-alive must not reap it
        rp = self.revision(target)
        rp.retired = False
        rp.warmed_at = time.monotonic()  # keep-alive keeps what a deploy or rollback warmed
        try:
            await rp.ensure_zygote()
        except BaseException:
            self.discard(target)
            raise
        assert rp.zygote is not None
        return rp.zygote.ready.result()

    def discard(self, target: Target) -> None:
        self._live.discard(target.key)
        rp = self.revisions.pop(target.key, None)
        if rp is not None:
            rp.stop()
            self._release_revision(target)

    async def scale(self, target: Target, instances: int) -> int:
        return await self.revision(target).scale_to(instances)

    # ---- quotas ----
    def set_quotas(self, quotas: dict[str, Quota]) -> None:
        self.quotas = dict(quotas)

    def admit(self, target: Target) -> None:
        """Raise 429 when one more instance of `target` would exceed its namespace's quota."""
        quota = self.quotas.get(target.namespace)
        if quota is None or not (quota.instances or quota.memory_mb):
            return
        count = memory = 0
        for rp in self.revisions.values():
            if rp.target.namespace == target.namespace:
                count += rp.count
                zygote = rp.zygote is not None and not rp.zygote.dead
                memory += (rp.count + zygote) * rp.spec.memory  # a zygote counts as one more
        ns = target.namespace
        if quota.instances and count + 1 > quota.instances:
            raise QuotaReached(
                f"namespace '{ns}' runs {count} instances, its quota max_instances="
                f"{quota.instances}; retry later or raise it (`ember quota set {ns} "
                "--instances N`)",
                headers={"Retry-After": "1"},
            )
        own = self.revisions.get(target.key)
        warm = own is not None and own.zygote is not None and not own.zygote.dead
        needs = target.spec.memory * (1 if warm else 2)
        if quota.memory_mb and memory + needs > quota.memory_mb:
            raise QuotaReached(
                f"namespace '{ns}' instances and zygotes use {memory} MB, one more instance "
                f"of '{target.function}' needs {needs} MB over its quota "
                f"max_memory={quota.memory_mb} MB; retry later or raise it",
                headers={"Retry-After": "1"},
            )

    # ---- zygotes and the sandbox ----
    async def start_zygote(self, target: Target, init_timeout: float) -> FunctionZygote:
        """Fork a zygote-to-be and send it `target`'s spec on its own channel.

        Each zygote gets cgroups of its own (a directory per zygote start, so no name is ever
        reused); its instances' memory leaves go below them. In the root sandbox a spare,
        already placed in cgroups of its own, is used when there is one: it only gets the
        revision's limits (no migration, which can wait out an RCU grace period), and a new
        spare is made in the background.
        """
        plan = self._plan(target)
        directory = ""
        if self.cgroups is not None and (plan is None or self.probe.mode != "root"):
            # The zygote stays in the server's cgroups; its instances still get memory leaves.
            self._forget_zygote_dirs(target)
            directory = f"{target.slug}.{secrets.token_hex(3)}"
            await asyncio.get_running_loop().run_in_executor(
                self._mover, self.cgroups.parent_for_instances, directory
            )
            self._zygote_dirs.setdefault(target.key, []).append(directory)
            sock = self._spawn([], split=False)
        elif plan is None or self.cgroups is None or self.probe.mode != "root":
            sock = self._spawn([], split=False)
        else:
            self._forget_zygote_dirs(target)  # their processes died with the previous pid 1
            spec = target.spec
            zygote_mb = spec.memory + min(spec.scale.max * PRE_MOVE_MB, PRE_MOVE_CAP_MB)
            spare = await self._use_spare(target, zygote_mb)
            if spare is not None:
                sock, directory = spare.sock, spare.slug
            else:
                directory = f"{target.slug}.{secrets.token_hex(3)}"
                joins = await asyncio.get_running_loop().run_in_executor(
                    self._mover, self.cgroups.revision, directory, zygote_mb, spec.pids, spec.cpu
                )
                sock = self._spawn(joins, split=True)
            self._zygote_dirs.setdefault(target.key, []).append(directory)
            self._replenish()
        zygote = FunctionZygote(sock, target)
        zygote.cgroup_dir = directory
        zygote.channel.send(spec_message(target, init_timeout, plan))
        return zygote

    def _spawn(self, cgroups: list[str], split: bool) -> socket.socket:
        try:
            return self.root.spawn_blank(cgroups, split)
        except OSError:  # the root died and we have not read its EOF yet: the caller retries
            self.root.forget()
            raise

    def _plan(self, target: Target) -> SandboxPlan | None:
        """What the revision's zygote sets up before its import; None without a sandbox."""
        if not self.sandboxed:
            return None
        uid = target.uid or self.config.sandbox_uid_base
        return SandboxPlan(
            root=str(self.config.sandbox_root),
            uid=uid,
            gid=uid,
            hostname=target.function[:63],
            tmp_mb=target.spec.tmp,
            hide=[str(self.config.home)],
            secrets=dict(target.secrets),
            userns=self.probe.mode == "userns",
        )

    def _forget_zygote_dirs(self, target: Target) -> None:
        """Queue the cgroups of a revision's earlier zygotes for removal (retried until empty)."""
        for directory in self._zygote_dirs.pop(target.key, []):
            self._unremoved.add(directory)

    async def _use_spare(self, target: Target, zygote_mb: int) -> Spare | None:
        spare, self._spare = self._spare, None
        if spare is None or self.cgroups is None:
            return None
        if not _alive(spare.sock):  # e.g. the root zygote was restarted since
            self._drop_spare(spare)
            return None
        spec = target.spec
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._mover,
                self.cgroups.assign,
                spare.slug,
                spare.joins[-1],
                zygote_mb,
                spec.pids,
                spec.cpu,
            )
        except OSError as exc:
            log.warning("could not hand a spare zygote to %s: %s", target.label, exc)
            self._drop_spare(spare)
            return None
        return spare

    def _replenish(self) -> None:
        if self._spare is None and (self._spare_task is None or self._spare_task.done()):
            self._spare_task = asyncio.get_running_loop().create_task(self._make_spare())

    async def _make_spare(self) -> None:
        if self.cgroups is None or self.probe.mode != "root" or self._stopping:
            return
        slug = f"spare-{secrets.token_hex(4)}"
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            joins = await loop.run_in_executor(
                self._mover, self.cgroups.revision, slug, 64, 64, 0.0
            )
            await self.root.ensure()
            sock = self.root.spawn_blank(joins, split=True, spare=True)
            sock.setblocking(False)
            async with asyncio.timeout(30):  # until it is in its cgroups
                report = _SPARE_DECODER.decode(await loop.sock_recv(sock, 65536))
            if not isinstance(report, SpareReady):
                raise OSError(f"the spare zygote reported {report!r}")
        except (OSError, TimeoutError, msgspec.DecodeError) as exc:
            log.warning("could not make a spare zygote: %s", exc)
            if sock is not None:
                sock.close()
            self._unremoved.add(slug)
            return
        self._spare = Spare(slug, joins, sock)

    def _drop_spare(self, spare: Spare) -> None:
        spare.sock.close()  # it sees EOF and exits
        self._unremoved.add(spare.slug)

    def _release_revision(self, target: Target) -> None:
        self._forget_zygote_dirs(target)

    # ---- limits ----
    def rlimit_for(self, memory_mb: int) -> int:
        """Address-space limit the instance sets itself, where there are no cgroups."""
        return 0 if self.cgroups is not None else memory_mb * 1024 * 1024

    def place(self, inst: Instance, zygote_dir: str, memory_mb: int) -> None:
        """Move a new instance into its own memory cgroup, off the request's path.

        Moving a process between cgroups can wait out an RCU grace period (7-19 ms measured
        here), so a worker thread does it once the pid is known; the instance serves meanwhile,
        for those few milliseconds under its zygote's cgroup.
        """
        if self.cgroups is None or not zygote_dir:
            return
        task = asyncio.get_running_loop().create_task(self._place(inst, zygote_dir, memory_mb))
        inst.placed = task

    async def _place(self, inst: Instance, rev: str, memory_mb: int) -> None:
        pid = await inst.pid_known
        loop = asyncio.get_running_loop()
        inst.cgroup = await loop.run_in_executor(
            self._mover, self._move, rev, inst.id, pid, memory_mb
        )

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

    def release_cgroup(self, procs: str) -> None:
        """Remove a leaf; one that still holds a dying process is retried on every tick."""
        if procs and self.cgroups is not None and not self.cgroups.remove(procs):
            self._unremoved_leaves.add(procs)

    def oom_killed(self, procs: str) -> bool:
        return bool(procs) and self.cgroups is not None and self.cgroups.oom_killed(procs)

    def peak_kb(self, procs: str) -> int:
        return self.cgroups.peak_kb(procs) if procs and self.cgroups is not None else 0

    # ---- logs ----
    def instance_log(self, target: Target, instance: str, msg: Log) -> None:
        self.telemetry.log(
            LogRecord(
                ts=msg.ts,
                function=target.qualified,
                revision=target.number,
                request_id=msg.id,
                instance=instance,
                stream=msg.stream,
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
        the function's idle times (end of activity to the next request) feed its histogram."""
        fn = target.qualified
        count = self._busy.get(fn, 0)
        if busy:
            if count == 0 and fn in self._idle_since:
                hist = self.histograms.setdefault(fn, IdleHistogram())
                hist.record(now - self._idle_since[fn])
            self._busy[fn] = count + 1
        else:
            self._busy[fn] = max(0, count - 1)
            if self._busy[fn] == 0:
                self._idle_since[fn] = now

    def keepalive_windows(self, function: str) -> Windows:
        hist = self.histograms.get(function)
        if hist is None:
            return Windows(0.0, self.config.zygote_keepalive, False, "fixed: no idle times yet")
        return windows(hist, self.config.zygote_keepalive)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self.tick(time.monotonic())
            except Exception:  # a bug here must not end keep-alive for every function
                log.exception("keep-alive tick failed")

    def tick(self, now: float) -> None:
        for key, rp in list(self.revisions.items()):
            if rp.retired:
                rp.drain()
                idle = not rp.instances and not rp.zygote_alive and not rp.starting
                if idle and not rp.demand and not rp.waiters:
                    rp.stop()
                    del self.revisions[key]
                    self._release_revision(rp.target)
                continue
            rp.autoscale(now)
            self._keep_zygote(rp, now)
        self.budget.tick()
        if self.cgroups is not None:
            for procs in list(self._unremoved_leaves):
                if self.cgroups.remove(procs):
                    self._unremoved_leaves.discard(procs)
            for slug in list(self._unremoved):
                if self.cgroups.remove_revision(slug):
                    self._unremoved.discard(slug)

    def _keep_zygote(self, rp: RevisionPool, now: float) -> None:
        fn = rp.target.qualified
        in_use = bool(rp.count or rp.demand or rp.waiters)
        in_use = in_use or (self._busy.get(fn, 0) > 0 and not rp.standby)  # its traffic is on
        in_use = in_use or now - rp.warmed_at < self.config.zygote_keepalive
        ended = self._idle_since.get(fn)
        if ended is None and rp.zygote is not None and not rp.zygote.dead:
            ended = rp.zygote.last_used  # deployed (probed) but not used since the server began
        idle_for = None if ended is None else now - ended
        w = self.keepalive_windows(fn)
        action = zygote_action(w, rp.zygote_alive, in_use, idle_for)
        if action is Action.RELEASE and rp.zygote is not None and rp.zygote.ready.done():
            rp.release_zygote()
        elif action is Action.PREWARM and now >= rp.backoff_until and not rp.standby:
            rp.prewarm()

    def statistics(self) -> list[RevisionStats]:
        return [rp.statistics() for rp in self.revisions.values()]

    async def shutdown(self) -> None:
        self._stopping = True
        if self._spare_task is not None:
            self._spare_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._spare_task
        if self._spare is not None:
            self._spare.sock.close()
            self._spare = None
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for rp in self.revisions.values():
            rp.stop()
        await self.root.stop()
        self._mover.shutdown(wait=True)
        if self.cgroups is not None:
            deadline = time.monotonic() + 2.0  # killed instances take a moment to leave
            while not self.cgroups.cleanup() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
