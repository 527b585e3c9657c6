"""The work on a deploy's path: how many hops to worker threads and to the store it takes, that a
refused deploy leaves no code behind, and that measuring memory never holds up cgroup work (a
deploy's spare zygote is handed over on the cgroup thread).

The control plane runs for real here (store, bundles, functions, publisher) over a pool that
only answers: no process is started."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import pytest

from ember import auth, bundle
from ember.api.control import Control
from ember.blobs.local import LocalBlobs
from ember.config import ServerConfig
from ember.errors import UserError
from ember.gateway.router import RouteTable
from ember.pool import usage
from ember.pool.manager import Pool
from ember.pool.placement import Placement
from ember.pool.spares import Spare, Spares
from ember.pool.target import Target
from ember.secretbox import SecretBox
from ember.spec import FunctionSpec, Quota
from ember.store.sqlite import SQLiteStore
from ember.telemetry.buffer import TelemetryBuffer
from ember.telemetry.outcomes import Outcomes
from ember.wire.messages import ZygoteReady


class AnsweringPool:
    """What the control plane asks of the pool, answered at once."""

    def __init__(self) -> None:
        self.prepared: list[Target] = []

    async def prepare(self, target: Target) -> ZygoteReady:
        self.prepared.append(target)
        return ZygoteReady(pid=1, import_ms=0.5)

    def discard(self, target: Target) -> None:
        pass

    async def scale(self, target: Target, instances: int) -> int:
        return instances

    def serve(self, serving: Iterable[Target], standby: Iterable[Target]) -> None:
        pass

    def serve_functions(self, routed: dict[str, tuple[list[Target], list[Target]]]) -> None:
        pass

    def set_quotas(self, quotas: dict[str, Quota]) -> None:
        pass


def _bundle(tmp_path: Path, name: str, manifest: str = "") -> bytes:
    src = tmp_path / "src" / name
    src.mkdir(parents=True)
    (src / "handler.py").write_text("def handle(req, ctx):\n    return 'ok'\n")
    if manifest:
        (src / "ember.yaml").write_text(manifest)
    return bundle.pack(src)


def run(tmp_path: Path, body: Callable[[Control], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        config = ServerConfig(home=tmp_path / "home")
        for path in (config.home, config.code_dir, config.blob_dir):
            path.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore(config.db_path)
        await store.open()
        control = Control(
            config,
            store,
            LocalBlobs(config.blob_dir),
            AnsweringPool(),  # type: ignore[arg-type]
            RouteTable(),
            auth.KeyTable(),
            SecretBox.load_or_create(config.master_key_path),
            Outcomes(),
            lambda _key: None,
        )
        await control.restore()
        try:
            await body(control)
        finally:
            await control.stop()
            await store.close()

    asyncio.run(main())


def test_a_deploy_takes_two_worker_thread_hops_and_three_store_trips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the code was moved to its content address in a hop of its own, the staging
    path was looked at in another, and the function was read back in two trips to the store;
    each hop is a wake-up of the loop (and, on a busy host, a wait for the GIL) on the deploy's
    path. Now: unpack + hash + install in one hop, the blob in another (beside the probe),
    and the store is asked for the next number, to add the revision, and to read it back."""
    hops: list[str] = []
    real_to_thread = asyncio.to_thread

    async def counted(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await real_to_thread(fn, *args, **kwargs)

    async def body(control: Control) -> None:
        trips: list[str] = []
        real_run = control.store._run  # type: ignore[attr-defined]

        async def run_counted(fn: Callable[..., Any]) -> Any:
            trips.append(fn.__name__)
            return await real_run(fn)

        control.store._run = run_counted  # type: ignore[attr-defined]
        data = _bundle(tmp_path, "hello")
        monkeypatch.setattr(asyncio, "to_thread", counted)
        [deployed] = await control.deploys.deploy(data, "hello", "default")
        monkeypatch.setattr(asyncio, "to_thread", real_to_thread)
        assert deployed.created and deployed.revision == 1
        assert sorted(hops) == ["_put_new", "_stage"], hops
        assert len(trips) == 3, trips
        code = control.bundles.code_dir(_digest(data))
        assert (code / "handler.py").is_file()
        assert control.functions.serving("default/hello") is not None
        assert not [p for p in code.parent.iterdir() if p.name.startswith(".tmp-")]

    run(tmp_path, body)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_deploy_refused_by_a_check_leaves_no_code_behind(tmp_path: Path) -> None:
    """The code is installed in the same step that unpacks it, before the checks: a deploy the
    checks refuse (here: a secret that does not exist) takes it away again."""
    manifest = "functions:\n  sealed:\n    secrets: [{name: missing}]\n"

    async def body(control: Control) -> None:
        data = _bundle(tmp_path, "sealed", manifest)
        with pytest.raises(UserError):
            await control.deploys.deploy(data, "sealed", "default")
        await control.bundles.close()  # the deletion set aside, done
        assert not control.bundles.code_dir(_digest(data)).exists()
        left = [p.name for p in control.config.code_dir.iterdir()]
        assert not [n for n in left if not n.startswith(".trash-")], left
        assert control.functions.serving("default/sealed") is None

    run(tmp_path, body)


def test_the_same_code_again_leaves_no_staging_behind(tmp_path: Path) -> None:
    """A second function with the same bundle finds its code installed: its staging goes."""

    async def body(control: Control) -> None:
        data = _bundle(tmp_path, "twin")
        await control.deploys.deploy(data, "twin", "default")
        await control.deploys.deploy(data, "twin2", "default")
        await control.bundles.close()
        names = [p.name for p in control.config.code_dir.iterdir()]
        assert names.count(_digest(data)) == 1
        assert not [n for n in names if n.startswith(".tmp-")], names

    run(tmp_path, body)


class _Idle:
    """A revision as the memory measurer sees it: one process to measure."""

    def measurable(self) -> list[tuple[object, int]]:
        return [("zygote", 1)]

    def measured(self, values: list[tuple[object, int]]) -> bool:
        return False


def test_measuring_memory_never_holds_up_cgroup_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: smaps reads shared the cgroup thread, so a batch of them (up to ~100
    processes, tens of milliseconds at 1,000 functions) held up what was queued behind it:
    handing a spare zygote to a deploy, placing a new instance."""
    release = threading.Event()
    threads: list[str] = []

    def slow_pss(pids: list[int]) -> list[int | None]:
        threads.append(threading.current_thread().name)
        assert release.wait(10)
        return [1024 for _ in pids]

    monkeypatch.setattr(usage, "pss_kb", slow_pss)

    async def main() -> None:
        pool = Pool(ServerConfig(home=tmp_path), TelemetryBuffer(1024))
        try:
            pool.usage.measure(_Idle(), 0.0)  # type: ignore[arg-type]
            pool.usage.tick(10.0)
            for _ in range(200):
                if threads:
                    break
                await asyncio.sleep(0.01)
            assert threads and threads[0].startswith("ember-usage")
            got = await asyncio.wait_for(pool.placement.run(lambda: "placed"), 2.0)
            assert got == "placed"  # while the measurement is still under way
        finally:
            release.set()
            await pool.usage.shutdown()
            pool.placement.shutdown()

    asyncio.run(main())


def test_the_store_reads_a_function_and_its_revisions_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(tmp_path / "ember.db")
        await store.open()
        try:
            assert await store.function_and_revisions("default/none") == (None, [])
            spec = FunctionSpec(name="f")
            await store.add_revision("default/f", spec, "a" * 64, "b" * 64, 1.0)
            await store.add_revision("default/f", spec, "c" * 64, "b" * 64, 2.0)
            fn, revisions = await store.function_and_revisions("default/f")
            assert fn == await store.function("default/f")
            assert revisions == await store.revisions("default/f")
            assert [r.number for r in revisions] == [1, 2] and fn is not None and fn.revision == 2
        finally:
            await store.close()

    asyncio.run(main())


class _AssignOnly:
    """Cgroups that note which thread gives a spare its limits."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def assign(self, spare: str, zygote_leaf: str, zygote_mb: int, pids: int, cpu: float) -> None:
        self.threads.append(threading.current_thread().name)


def test_a_spare_is_handed_over_without_waiting_for_the_cgroup_threads_queue() -> None:
    """Regression: a deploy's spare zygote got its limits on the cgroup thread, behind whatever
    was queued there (a new instance's memory leaf, the next spare's directories, a sweep)."""

    async def main() -> None:
        cgroups = _AssignOnly()
        placement = Placement(cgroups)  # type: ignore[arg-type]
        spares = Spares(None, placement)  # type: ignore[arg-type]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spares._spares.append(Spare("spare-1", ["/x/zygote-1/cgroup.procs"], ours))
        busy = threading.Event()
        blocked = asyncio.ensure_future(placement.run(busy.wait, 10))
        try:
            got = await asyncio.wait_for(spares.take(FunctionSpec(name="f"), 132), 2.0)
            assert got is not None and got.slug == "spare-1"
            assert cgroups.threads and not cgroups.threads[0].startswith("ember-cgroup_")
            assert not blocked.done()  # the cgroup thread was still busy meanwhile
        finally:
            busy.set()
            await blocked
            placement.shutdown()
            ours.close()
            theirs.close()

    asyncio.run(main())
