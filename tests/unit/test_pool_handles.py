"""The server's handles on zygotes and instances, against real sockets (no processes)."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
from pathlib import Path

import msgspec
import pytest

from ember.config import ServerConfig
from ember.errors import PlatformError
from ember.pool import manager
from ember.pool.call import Call
from ember.pool.host import PoolSettings
from ember.pool.instance import Instance
from ember.pool.manager import Pool
from ember.pool.placement import MemoryVerdict, Placement
from ember.pool.revision import RevisionPool
from ember.pool.target import Target
from ember.pool.zygote import FunctionZygote
from ember.spec import FunctionSpec, ScaleSpec
from ember.telemetry.buffer import TelemetryBuffer
from ember.wire.frames import frame
from ember.wire.messages import Forked, Invoke, Log, Result, ZygoteStarted

TARGET = Target("fn", 1, "0" * 64, "/nonexistent", FunctionSpec(name="fn", concurrency=4))


def test_a_pid_reported_without_credentials_is_refused_not_signalled() -> None:
    """Regression: `sender or msg.pid` trusted the pid a (sandboxed) peer wrote itself."""

    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        zygote = FunctionZygote(ours, TARGET)
        inst = await zygote.fork("fn-1-abc", 0, lambda _i, _m: None, lambda _i: None)
        zygote._on_message(Forked(instance="fn-1-abc", pid=1), 0)  # pid 1: init on the host
        assert inst.pid == 0 and inst.dead
        assert inst.death is not None and "SCM_CREDENTIALS" in inst.death.message
        assert inst.exit_status.done()
        zygote._on_message(ZygoteStarted(pid=1), 0)
        assert zygote.pid == 0
        with pytest.raises(PlatformError, match="credentials"):
            zygote.ready.result()
        theirs.close()

    asyncio.run(main())


class _Host:
    """The few calls `submit`, `settle` and the sweep make of a host."""

    def activity(self, target: Target, busy: bool, now: float) -> None:
        pass

    def account(self, rp: RevisionPool) -> None:
        pass

    def check_quota(self, target: Target) -> None:
        pass

    async def make_room(self, rp: RevisionPool, loop_deadline: float | None) -> None:
        pass

    def wake(self, rp: RevisionPool) -> None:
        pass

    def freed(self) -> None:
        pass

    async def verdict(self, procs: str) -> MemoryVerdict:
        return MemoryVerdict(False, 0)

    async def start_zygote(self, target: Target) -> None:
        raise AssertionError("no zygote in this test")

    def system_log(self, target: Target, text: str) -> None:
        pass


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(bytes(data))


class _Caller:
    def __init__(self) -> None:
        self.results: list[Result] = []
        self.errors: list[BaseException] = []

    def resolved(self, result: Result, tier: str, inst: Instance) -> None:
        self.results.append(result)

    def failed(self, error: BaseException) -> None:
        self.errors.append(error)


def _revision_with_an_instance(
    concurrency: int, target: Target = TARGET
) -> tuple[RevisionPool, Instance]:
    rp = RevisionPool(target, _Host(), PoolSettings(queue_depth=10, init_timeout=5))  # type: ignore[arg-type]
    inst = Instance("fn-1-abc", concurrency, lambda _i, _m: None, lambda _i: None)
    inst.connection_made(_Transport())
    inst.settle = rp.settle
    rp.instances[inst.id] = inst
    rp.release(inst)  # idle: the next call takes it
    return rp, inst


def _call(n: int, deadline: float, caller: _Caller) -> Call:
    return Call(Invoke(f"r{n}", "GET", "/", b"", [], b"", 0.0), deadline, caller, False)


def test_a_deadline_swept_after_the_result_arrived_kills_nothing() -> None:
    """Regression: the timeout and the result in one loop turn killed the instance, and with
    concurrency > 1 its other requests got false 502s."""

    async def main() -> None:
        rp, inst = _revision_with_an_instance(concurrency=4)
        first, second = _Caller(), _Caller()
        now = asyncio.get_running_loop().time()
        rp.submit(_call(0, now - 1, first))  # its deadline has passed already
        rp.submit(_call(1, now + 30, second))
        reply = Result(id="r0", status=200, headers=[], body=b"ok")
        inst.data_received(frame(msgspec.msgpack.encode(reply)))
        assert [r.status for r in first.results] == [200]  # answered in that same callback
        rp._sweep()  # the sweep comes in the same turn
        assert not inst.dead and inst.death is None
        assert not first.errors and not second.results and not second.errors
        assert "r1" in inst.inflight

    asyncio.run(main())


def test_a_call_past_its_deadline_is_ended_and_its_instance_killed() -> None:
    async def main() -> None:
        rp, inst = _revision_with_an_instance(concurrency=1)
        running, later = _Caller(), _Caller()
        now = asyncio.get_running_loop().time()
        rp.submit(_call(0, now - 1, running))
        rp.submit(_call(1, now + 30, later))
        rp._sweep()
        assert inst.dead and "another request on it timed out" in str(inst.death)
        assert len(running.errors) == 1 and "timed out after" in str(running.errors[0])
        assert "r0" not in inst.inflight and [c.msg.id for c in rp.calls] == ["r1"]
        assert not later.errors  # its deadline is 30 s away

    asyncio.run(main())


def test_a_call_that_waited_past_its_deadline_is_ended_without_running() -> None:
    one = Target("fn", 1, "0" * 64, "/nonexistent", FunctionSpec(name="fn", scale=ScaleSpec(max=1)))

    async def main() -> None:
        rp, inst = _revision_with_an_instance(concurrency=1, target=one)
        running, waiting = _Caller(), _Caller()
        now = asyncio.get_running_loop().time()
        rp.submit(_call(0, now + 30, running))
        rp.submit(_call(1, now - 1, waiting))  # at scale.max: it waits for the instance
        assert [c.msg.id for c in rp.waiters] == ["r1"]
        rp._sweep()
        assert not rp.waiters and len(waiting.errors) == 1
        assert "while it was waiting for a free instance" in str(waiting.errors[0])
        assert not inst.dead and list(inst.inflight) == ["r0"]  # the running one goes on

    asyncio.run(main())


def test_an_instance_cannot_write_lines_as_ember(tmp_path: Path) -> None:
    """`system` lines are Ember's own ([ember] notices); an instance runs the function's code,
    so a `system` line from it is kept as stderr."""
    telemetry = TelemetryBuffer(1024)
    pool = Pool(ServerConfig(home=tmp_path), telemetry)
    try:
        for stream in ("system", "stdout", "log"):
            pool.instance_log(TARGET, "i", Log(id="", stream=stream, ts=0.0, data="x\n"))
        _acts, logs = telemetry.drain()
        assert [r.stream for r in logs] == ["stderr", "stdout", "log"]
    finally:
        pool.placement.shutdown()


def test_one_revision_that_raises_does_not_stop_the_tick_for_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: an exception for one revision skipped the rest of the tick (other
    revisions, the budget, the cgroup sweep), every tick while it persisted."""
    pool = Pool(ServerConfig(home=tmp_path), TelemetryBuffer(1024))
    try:
        bad = Target("bad", 1, "1" * 64, "/nonexistent", FunctionSpec(name="bad"))
        good = Target("good", 1, "2" * 64, "/nonexistent", FunctionSpec(name="good"))
        pool.retire_all_but([bad.key, good.key])
        broken, fine = pool.open_revision(bad), pool.open_revision(good)

        def fail(now: float, step: float) -> None:
            raise RuntimeError("a bug for this revision only")

        stepped: list[float] = []
        autoscale = fine.autoscale

        def counted(now: float, step: float) -> object:
            stepped.append(now)
            return autoscale(now, step)

        broken.autoscale = fail  # type: ignore[method-assign]
        fine.autoscale = counted  # type: ignore[method-assign]
        sweeps = []
        pool.placement.sweep = lambda: sweeps.append(1)  # type: ignore[method-assign]
        with caplog.at_level("ERROR", logger="ember.pool"):
            for n in range(1, 4):
                pool.wake(fine)  # something happened to it: due at this tick
                pool.tick(float(n))
        assert stepped == [1.0, 2.0, 3.0]  # the good revision was stepped every time it was due
        assert sweeps == [1, 1, 1]
        assert pool.due.when(bad.key) == 3.0 + manager.STEP  # the failing one: again next step
        errors = [r for r in caplog.records if "bad@1" in r.getMessage()]
        assert len(errors) == 1  # logged once while it persists
    finally:
        pool.placement.shutdown()


class _RecordingCgroups:
    """Records which thread touches the file system."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def remove(self, procs: str) -> bool:
        self.threads.append(threading.current_thread().name)
        return True

    def remove_revision(self, slug: str) -> bool:
        self.threads.append(threading.current_thread().name)
        return True

    def oom_killed(self, procs: str) -> bool:
        self.threads.append(threading.current_thread().name)
        return True

    def peak_kb(self, procs: str) -> int:
        return 2048


def test_cgroup_removal_and_reads_never_run_on_the_event_loop() -> None:
    """Regression: rmdir of cgroups every tick and the reads of a dead instance's cgroup ran
    on the event loop that serves requests."""

    async def main() -> None:
        cgroups = _RecordingCgroups()
        placement = Placement(cgroups)  # type: ignore[arg-type]
        try:
            placement.release("/sys/fs/cgroup/x/leaf/cgroup.procs")
            placement.drop_tree("spare-1")
            placement.sweep()
            assert await placement.verdict("/sys/fs/cgroup/x/leaf/cgroup.procs") == (True, 2048)
            for _ in range(100):
                if not placement.pending:
                    break
                await asyncio.sleep(0.01)
            assert placement.pending == 0
            assert cgroups.threads and all(t.startswith("ember-cgroup") for t in cgroups.threads)
        finally:
            placement.shutdown()

    asyncio.run(main())


def test_a_tick_steps_only_the_revisions_that_are_due_however_many_sleep(tmp_path: Path) -> None:
    """Regression: every tick walked every revision (autoscaler sample, keep-alive decision),
    so its cost grew with the functions deployed, idle or not. Now a quiet revision (nothing
    to sample, start or stop) is stepped again only at its next keep-alive edge or when
    something happens to it."""
    pool = Pool(ServerConfig(home=tmp_path), TelemetryBuffer(1024))
    try:
        targets = [
            Target(f"f{i}", 1, f"{i:064d}", "/nonexistent", FunctionSpec(name=f"f{i}"))
            for i in range(1000)
        ]
        pool.retire_all_but([t.key for t in targets])
        revisions = [pool.open_revision(t) for t in targets]
        stepped: list[str] = []
        step = pool._step

        def counted(key: tuple[str, str, int, str], rp: RevisionPool, now: float) -> float | None:
            stepped.append(key[1])
            return step(key, rp, now)

        pool._step = counted  # type: ignore[method-assign]
        pool.tick(1.0)
        assert len(stepped) == 1000  # each new pool once
        stepped.clear()
        for n in range(2, 10):
            pool.tick(float(n))
        assert stepped == [] and len(pool.due) == 0  # all quiet: nothing is due
        revisions[7].demand = 1  # a request begins on f7 (as RevisionPool.invoke reports it)
        revisions[7].backoff_until = math.inf  # no instance can start here (no zygote): none tried
        pool.activity(targets[7], busy=True, now=10.0)
        for n in range(10, 13):
            pool.tick(n + 0.25 * (n - 10))
        assert stepped == ["f7", "f7", "f7"]  # busy: stepped every STEP, the others not at all
        revisions[7].demand = 0
        pool.activity(targets[7], busy=False, now=13.0)
        pool.tick(13.0)
        # Within its idle grace it is stepped on (its instance may have to go), alone.
        assert len(pool.due) == 1 and pool.due.when(targets[7].key) == 13.0 + manager.STEP
    finally:
        pool.placement.shutdown()


class _ActivityHost(_Host):
    def __init__(self) -> None:
        self.events: list[str] = []

    def activity(self, target: Target, busy: bool, now: float) -> None:
        self.events.append("busy" if busy else "idle")


class _NotingCaller(_Caller):
    def __init__(self, host: _ActivityHost) -> None:
        super().__init__()
        self.host = host

    def resolved(self, result: Result, tier: str, inst: Instance) -> None:
        self.host.events.append("answered")
        super().resolved(result, tier, inst)


def test_the_caller_is_answered_before_the_revision_turns_idle() -> None:
    """The idle transition (activity, the budget, a measurement) comes after the answer, off
    the request's path; the instance is free again before it (a pipelined request takes it)."""

    async def main() -> None:
        host = _ActivityHost()
        rp = RevisionPool(TARGET, host, PoolSettings(queue_depth=10, init_timeout=5))  # type: ignore[arg-type]
        inst = Instance("fn-1-abc", 1, lambda _i, _m: None, lambda _i: None)
        inst.connection_made(_Transport())
        inst.settle = rp.settle
        rp.instances[inst.id] = inst
        rp.release(inst)
        caller = _NotingCaller(host)
        rp.submit(_call(0, asyncio.get_running_loop().time() + 30, caller))
        free_when_answered: list[bool] = []
        original = caller.resolved

        def resolved(result: Result, tier: str, answered_by: Instance) -> None:
            free_when_answered.append(inst in rp.idle)
            original(result, tier, answered_by)

        caller.resolved = resolved  # type: ignore[method-assign]
        inst.data_received(frame(msgspec.msgpack.encode(Result("r0", 200, [], b"ok"))))
        assert host.events == ["busy", "answered", "idle"]
        assert free_when_answered == [True]
        assert rp.demand == 0

    asyncio.run(main())


def test_async_work_takes_only_free_capacity() -> None:
    """`has_room`: an idle instance, or a start within scale.max, and no synchronous caller
    waiting (ember.queue's lanes submit only then)."""

    async def main() -> None:
        one = Target(
            "fn", 1, "0" * 64, "/nonexistent", FunctionSpec(name="fn", scale=ScaleSpec(max=1))
        )
        rp, _ = _revision_with_an_instance(concurrency=1, target=one)
        assert rp.has_room()  # its one instance is idle
        deadline = asyncio.get_running_loop().time() + 30
        busy, waiting = _Caller(), _Caller()
        rp.submit(_call(0, deadline, busy))
        assert not rp.has_room()  # at scale.max, its instance busy
        rp.submit(_call(1, deadline, waiting))
        assert len(rp.waiters) == 1
        rp.instances.clear()  # (as if the instance had died: a start would be allowed again)
        assert not rp.has_room()  # ... but a synchronous call waits, and goes first
        rp.waiters.clear()
        assert rp.has_room()

    asyncio.run(main())


def test_a_backlog_of_async_work_is_demand_for_the_autoscaler() -> None:
    async def main() -> None:
        spec = FunctionSpec(name="fn", scale=ScaleSpec(min=1, max=10))  # (none to stop)
        target = Target("fn", 1, "0" * 64, "/nonexistent", spec)
        plain, backlogged = (_revision_with_an_instance(1, target)[0] for _ in range(2))
        backlogged.backlog = 6
        now = asyncio.get_running_loop().time()
        for rp in (plain, backlogged):
            rp.backoff_until = math.inf  # decide only: no start
        assert not backlogged.quiet(now)
        assert plain.autoscale(now, 0.25).desired == 1
        assert backlogged.autoscale(now, 0.25).desired >= 6

    asyncio.run(main())
