"""Layer zygotes as the server holds them (against real sockets, no processes): what each
preloads, how they are keyed, counted, evicted and stopped."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from pathlib import Path

import pytest

from ember.config import ServerConfig
from ember.errors import QuotaReached
from ember.pool.layer_zygotes import LayerZygote, LayerZygotes, layer_key, preload_names
from ember.pool.manager import Pool
from ember.pool.quotas import check_quota
from ember.pool.target import Target
from ember.spec import FunctionSpec, Quota
from ember.telemetry.buffer import TelemetryBuffer
from ember.wire.messages import SandboxPlan, ZygoteReady, ZygoteStarted

MODULE = """
import os, json
import numpy as np
from pandas.core import frame
from . import sibling
import notinlayer
try:
    import scipy
except ImportError:
    scipy = None

def handle(req, ctx):
    import lazyloaded
    return {}
"""


def _target(tmp: Path, function: str = "fn", **spec: object) -> Target:
    code, layer = tmp / "code", tmp / "layers" / ("a" * 64) / "site"
    code.mkdir(parents=True, exist_ok=True)
    (code / "handler.py").write_text(MODULE)
    for package in ("numpy", "pandas", "scipy", "lazyloaded"):
        (layer / package).mkdir(parents=True, exist_ok=True)
    (layer / "numpy-2.0.dist-info").mkdir(exist_ok=True)
    return Target(
        function,
        1,
        "0" * 64,
        str(code),
        FunctionSpec(name=function, **spec),  # type: ignore[arg-type]
        layer_dir=str(layer),
    )


def test_it_preloads_the_layers_packages_the_module_imports_then_preload(tmp_path: Path) -> None:
    target = _target(tmp_path, preload=["scipy.signal"])
    # module level only (a try block runs at import; a function's body does not); in order;
    # not what the layer lacks (os, notinlayer) nor relative imports
    assert preload_names(target) == ["numpy", "pandas", "scipy", "scipy.signal"]


def test_a_module_that_does_not_parse_preloads_only_the_list(tmp_path: Path) -> None:
    target = _target(tmp_path, preload=["numpy"])
    Path(target.code_dir, "handler.py").write_text("def broken(:\n")
    assert preload_names(target) == ["numpy"]


def test_the_key_follows_what_the_sandbox_holds(tmp_path: Path) -> None:
    plan = SandboxPlan(root="/r", uid=900001, gid=900001, hostname="fn", secrets={"s": b"1"})
    target = _target(tmp_path)
    key = layer_key(target, {"A": "1"}, plan)
    assert layer_key(target, {"A": "1"}, plan) == key
    assert layer_key(_target(tmp_path, "other"), {"A": "1"}, plan) != key  # never two functions
    assert layer_key(target, {"A": "2"}, plan) != key
    changed = SandboxPlan(root="/r", uid=900001, gid=900001, hostname="fn", secrets={"s": b"2"})
    assert layer_key(target, {"A": "1"}, changed) != key
    assert layer_key(_target(tmp_path, memory=256), {"A": "1"}, plan) != key
    other_ns = Target(
        "fn", 1, "0" * 64, target.code_dir, target.spec, namespace="team", layer_dir="x"
    )
    assert layer_key(other_ns, {"A": "1"}, plan)[0] == "team"


def _ready(lz: LayerZygote, pid: int) -> None:
    lz.pid = pid
    lz.ready.set_result(ZygoteReady(pid=pid, import_ms=1.0))


def test_the_least_recently_used_idle_one_makes_room_and_a_used_one_never_goes(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        changes: list[int] = []
        layers = LayerZygotes(2, 3600.0, lambda: changes.append(1))
        socks = []
        made = []
        for i, name in enumerate(("one", "two")):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            socks.append(theirs)
            target = _target(tmp_path / name, name)
            lz = LayerZygote(ours, layer_key(target, {}, None), target)
            _ready(lz, 100 + i)
            lz.last_used = float(i)
            layers.add(lz, lambda _gone: None)
            made.append(lz)
        one, two = made
        one.fork("/code/x").close()  # "one" has a function zygote now; "two" is idle
        one.last_used = -1.0  # least recently used, but in use
        assert [e.what for e in layers.evictions(asking=False)] == [
            f"the layer zygote of {two.label}"
        ]
        assert layers.make_room() is True  # at most 2: the idle one went
        await asyncio.sleep(0.05)  # its channel sees the close
        assert two.dead and list(layers.by_key.values()) == [one]
        assert layers.make_room() is True  # 1 < 2
        layers.most = 1
        assert layers.make_room() is False  # the only one is in use
        one.child_gone()
        assert layers.make_room() is True
        for sock in socks:
            sock.close()

    asyncio.run(main())


def test_they_count_against_the_budget_and_the_quota(tmp_path: Path) -> None:
    async def main() -> None:
        layers = LayerZygotes(8, 3600.0, lambda: None)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        target = _target(tmp_path, memory=300)
        lz = LayerZygote(ours, layer_key(target, {}, None), target)
        layers.add(lz, lambda _gone: None)
        assert layers.counted_kb() == 300 * 1024  # at memory: until measured
        _ready(lz, 123)
        assert layers.measurable() == [(lz, 123)]
        layers.measured([(lz, 50_000)])
        assert layers.counted_kb() == 50_000
        assert layers.declared_mb("default") == 300 and layers.declared_mb("team") == 0
        quota = Quota(memory_mb=700)
        check_quota(quota, target, [], 0)  # 300 MB for an instance and its zygote: fits
        with pytest.raises(QuotaReached, match="layer zygotes too"):
            check_quota(quota, target, [], layers.declared_mb("default"))
        theirs.close()
        lz.stop()

    asyncio.run(main())


def test_an_unused_one_goes_when_its_function_is_gone_or_after_its_keepalive(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        layers = LayerZygotes(8, 60.0, lambda: None)
        keep = []
        for name in ("live", "gone", "stale"):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            keep.append(theirs)
            target = _target(tmp_path / name, name)
            lz = LayerZygote(ours, layer_key(target, {}, None), target)
            _ready(lz, 1)
            lz.last_used = 1000.0 if name != "stale" else 900.0
            layers.add(lz, lambda _gone: None)
        layers.tick(1010.0, lambda function: function != "default/gone")
        await asyncio.sleep(0.05)
        assert [lz.function for lz in layers.by_key.values()] == ["default/live"]
        for sock in keep:
            sock.close()

    asyncio.run(main())


def test_a_key_whose_layer_zygote_failed_gets_none_for_a_while() -> None:
    layers = LayerZygotes(8, 3600.0, lambda: None)
    key = ("default", "fn", "/l", "d")
    assert not layers.backing_off(key, 100.0)
    layers.failed(key, 100.0)
    assert layers.backing_off(key, 159.0)
    assert not layers.backing_off(key, 161.0)


def test_one_is_made_only_from_free_memory_and_quota(tmp_path: Path) -> None:
    async def main() -> None:
        pool = Pool(ServerConfig(home=tmp_path, memory_budget_mb=1000), TelemetryBuffer(64))
        try:
            assert pool.layers in list(pool.budget._occupants())  # what it may evict
            target = _target(tmp_path, memory=400)
            assert pool._room_for_layer(target)  # 400 of 1,000 MB
            assert not pool._room_for_layer(_target(tmp_path, memory=1200))
            pool.set_quotas({"default": Quota(memory_mb=1000)})
            assert not pool._room_for_layer(target)  # it, a zygote and an instance: 1,200
            pool.set_quotas({"default": Quota(memory_mb=1200)})
            assert pool._room_for_layer(target)
        finally:
            pool.placement.shutdown()

    asyncio.run(main())


def test_only_its_first_report_names_it(tmp_path: Path) -> None:
    """Later reports could come from the packages it imported (any process holding its
    channel): they never change which process is mounted into or killed."""

    async def main() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        target = _target(tmp_path)
        lz = LayerZygote(ours, layer_key(target, {}, None), target)
        lz._on_message(ZygoteStarted(pid=1), os.getpid())
        first = lz.pidfd
        assert lz.pid == os.getpid() and first >= 0
        lz._on_message(ZygoteStarted(pid=1), os.getppid())
        assert (lz.pid, lz.pidfd) == (os.getpid(), first)
        lz.channel.close()
        assert lz.pidfd == -1  # closed with it
        theirs.close()

    asyncio.run(main())


def test_an_idle_one_gives_way_to_its_namespaces_quota(tmp_path: Path) -> None:
    async def main() -> None:
        pool = Pool(ServerConfig(home=tmp_path), TelemetryBuffer(64))
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            target = _target(tmp_path, memory=300)
            lz = LayerZygote(ours, layer_key(target, {}, None), target)
            _ready(lz, 1)
            pool.layers.add(lz, lambda _gone: None)
            pool.set_quotas({"default": Quota(memory_mb=700)})
            pool.check_quota(target)  # 300 + 600 > 700: the idle layer zygote went
            assert lz.channel.closed and not pool.layers.by_key
            ours2, theirs2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            lz2 = LayerZygote(ours2, layer_key(target, {}, None), target)
            _ready(lz2, 2)
            pool.layers.add(lz2, lambda _gone: None)
            lz2.fork("/code/x").close()  # in use: it stays, and the start is refused
            with pytest.raises(QuotaReached):
                pool.check_quota(target)
            lz2.channel.close()
            theirs.close()
            theirs2.close()
        finally:
            pool.placement.shutdown()

    asyncio.run(main())


def test_the_root_zygotes_helper_answers_with_the_errno_when_it_fails(tmp_path: Path) -> None:
    from ember.runtime import root
    from ember.wire.messages import MountCode

    answer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    not_a_pidfd_r, not_a_pidfd_w = os.pipe()
    os.close(not_a_pidfd_w)
    root._mount_code(MountCode(source=str(tmp_path), name="abc"), [answer.detach(), not_a_pidfd_r])
    report = reader.recv(4096)
    os.wait()
    reader.close()
    number, _, message = report.decode().partition(" ")
    assert int(number) == errno.EINVAL, report  # setns refused the fd: no success by default
    assert "entering the layer zygote's mounts" in message
