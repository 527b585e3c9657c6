"""Starting a function zygote on this node: a fork of the root zygote (or the spare zygote,
already in cgroups of its own), or, for a function with requirements, of its layer zygote
(layer_zygotes.py); the zygote's cgroups, its sandbox plan, and the function's spec sent on
the zygote's own channel.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable

from ember.config import ServerConfig
from ember.errors import PlatformError
from ember.pool.capabilities import SandboxProbe
from ember.pool.layer_zygotes import LayerKey, LayerZygote, LayerZygotes, layer_key, preload_names
from ember.pool.placement import Placement
from ember.pool.root import CodeMountFailed, RootZygote, function_env, spec_message
from ember.pool.spares import Spares
from ember.pool.target import Target
from ember.pool.zygote import FunctionZygote
from ember.runtime.sandbox import CODE_DIR as sandbox_code_dir
from ember.wire.messages import SandboxPlan, SpawnLayerZygote

log = logging.getLogger("ember.pool")

# A new instance is charged to its zygote's cgroup until the server moves it into its own:
# the zygote's limit is `memory` plus this much per instance of `scale.max`, at most the cap.
PRE_MOVE_MB = 4
PRE_MOVE_CAP_MB = 256


class _Shadowed(Exception):
    """The revision's own modules have names the layer zygote imported from the layer."""


def _shadowed(target: Target, preloaded: list[str]) -> list[str]:
    """Top-level names the layer zygote imported that the revision's code also has: with the
    layer's in `sys.modules` already, its own would not be imported. Reads the disk."""
    source = os.path.join(target.code_dir, target.spec.source)
    names = dict.fromkeys(name.partition(".")[0] for name in preloaded)
    return [
        name
        for name in names
        if os.path.exists(os.path.join(source, f"{name}.py"))
        or os.path.isdir(os.path.join(source, name))
    ]


def _zygote_mb(target: Target) -> int:
    spec = target.spec
    return spec.memory + min(spec.scale.max * PRE_MOVE_MB, PRE_MOVE_CAP_MB)


class ZygoteStarter:
    def __init__(
        self,
        config: ServerConfig,
        root: RootZygote,
        placement: Placement,
        spares: Spares,
        layers: LayerZygotes,
        room_for_layer: Callable[[Target], bool],
        system_log: Callable[[Target, str], None],
    ) -> None:
        self.config = config
        self.root = root
        self.placement = placement
        self.spares = spares
        self.layers = layers
        self.room_for_layer = room_for_layer  # within the memory budget and the quota
        self.system_log = system_log  # a line in a function's log
        self.probe = SandboxProbe("off")  # what the host allows, set when the pool starts
        self._joining: set[asyncio.Task[None]] = set()
        self._layer_starts: dict[LayerKey, asyncio.Task[LayerZygote]] = {}
        self._code_mounts = True  # False once the kernel refused to mount code into one

    @property
    def sandboxed(self) -> bool:
        return self.probe.mode in ("root", "userns")

    async def start(self, target: Target) -> tuple[FunctionZygote, bool]:
        """A new zygote for `target` (its import under way); True if the root zygote had to
        be (re)started for it."""
        fresh = await self.root.ensure()
        try:
            return await self._start(target), fresh
        except OSError:  # the root died and we have not read its EOF yet: one new root
            fresh = await self.root.ensure()
            return await self._start(target), fresh

    async def _start(self, target: Target) -> FunctionZygote:
        """Fork a zygote-to-be and send it `target`'s spec on its own channel; or, for a
        function with requirements, fork it from the function's layer zygote."""
        plan = self._plan(target)
        self.placement.forget_zygote_dirs(target.key)  # their processes died with the zygote
        if self._layered(target):
            zygote = await self._from_layer(target, plan)
            if zygote is not None:
                return zygote
        sock, directory = await self._blank(target, plan)
        if directory:
            self.placement.zygote_dir(target.key, directory)
        zygote = FunctionZygote(sock, target)
        zygote.cgroup_dir = directory
        zygote.channel.send(spec_message(target, self.config.init_timeout, plan))
        return zygote

    async def _blank(
        self, target: Target, plan: SandboxPlan | None, slug: str = "", zygote_mb: int = 0
    ) -> tuple[socket.socket, str]:
        """A zygote-to-be for `target` and the name of its cgroups ("": none), named after
        `slug` (the revision's by default), its memory cap `zygote_mb` (by default the
        revision's zygote's).

        Each zygote gets cgroups of its own (a directory per zygote start, so no name is ever
        reused); its instances' memory leaves go below them. In the root sandbox a spare,
        already placed in cgroups of its own, is used when there is one: it only gets the
        revision's limits (no migration, which can wait out an RCU grace period), and a new
        spare is made in the background.
        """
        cgroups = self.placement.cgroups
        directory = ""
        slug = slug or target.slug
        zygote_mb = zygote_mb or _zygote_mb(target)
        if cgroups is None:
            sock = self._spawn([], split=False)
        elif plan is None or self.probe.mode != "root":
            # The zygote stays in the server's cgroups; its instances still get memory leaves.
            directory = f"{slug}.{secrets.token_hex(3)}"
            await self.placement.run(cgroups.parent_for_instances, directory)
            sock = self._spawn([], split=False)
        else:
            spec = target.spec
            spare = await self.spares.take(spec, zygote_mb)
            if spare is not None:
                sock, directory = spare.sock, spare.slug
            else:
                directory = f"{slug}.{secrets.token_hex(3)}"
                joins = await self.placement.run(
                    cgroups.revision, directory, zygote_mb, spec.pids, spec.cpu
                )
                sock = self._spawn(joins, split=True)
            self.spares.replenish()
        return sock, directory

    # ---- from a layer zygote (layer_zygotes.py) ----
    def _layered(self, target: Target) -> bool:
        if not target.layer_dir or self.layers.most <= 0:
            return False
        return self.probe.mode == "off" or (self.probe.mode == "root" and self._code_mounts)

    async def _from_layer(self, target: Target, plan: SandboxPlan | None) -> FunctionZygote | None:
        """A function zygote forked from the function's layer zygote (made first if there is
        none and there is room for one); None: start it the usual way. Whatever goes wrong
        here only costs the start its layer zygote."""
        key = layer_key(target, function_env(target), plan)
        lz = self.layers.get(key)
        if lz is None:
            lz = await self._layer_for(target, plan, key)
            if lz is None:
                return None
        lz.pending += 1  # not evicted while this start uses it
        lz.last_used = time.monotonic()
        failure: Exception | None = None
        try:
            sock, directory, joins = await self._fork_from(lz, target, plan)
        except _Shadowed as exc:
            log.info("layer zygote of %s not used for %s: %s", lz.label, target.label, exc)
            return None
        except Exception as exc:
            failure = exc
        finally:
            lz.pending -= 1  # forked (it has a child now), or given up
        if failure is not None:
            log.warning("layer zygote of %s not used: %s", lz.label, failure)
            if isinstance(failure, CodeMountFailed) and failure.errno == errno.ENOSYS:
                self._code_mounts = False  # this kernel cannot (Linux < 5.12): none again
                log.warning("layer zygotes are off: this kernel cannot mount code into them")
            self.layers.failed(key, asyncio.get_running_loop().time())
            self.layers.evict(lz)
            return None
        if directory:
            self.placement.zygote_dir(target.key, directory)
        zygote = FunctionZygote(sock, target)
        zygote.cgroup_dir = directory
        zygote.on_exit = lz.child_gone
        zygote.channel.send(spec_message(target, self.config.init_timeout, plan))
        if joins:  # off its path: its import is charged to the layer zygote's cgroup meanwhile
            task = asyncio.get_running_loop().create_task(self._join(zygote, joins))
            self._joining.add(task)
            task.add_done_callback(self._joining.discard)
        return zygote

    async def _fork_from(
        self, lz: LayerZygote, target: Target, plan: SandboxPlan | None
    ) -> tuple[socket.socket, str, list[str]]:
        """Fork from `lz` once it is ready, the revision's code shown to it and its cgroups
        made: the new zygote's channel, the cgroups' name and what it joins."""
        async with asyncio.timeout(self.config.init_timeout + 5.0):
            ready = await asyncio.shield(lz.ready)
        if ready.import_anon_kb // 1024 > target.spec.memory:  # as a zygote's own import
            raise PlatformError(f"its packages use more than memory: {target.spec.memory}")
        if not lz.told:  # what its imports said, once, in the log of the function
            lz.told = True
            for warning in ready.warnings:
                self.system_log(target, f"[ember] layer zygote: {warning}\n")
            if ready.output:
                self.system_log(target, ready.output)
        if shadowed := await asyncio.to_thread(_shadowed, target, lz.preload):
            raise _Shadowed(f"its code has modules of the names {', '.join(shadowed)}")
        made = asyncio.ensure_future(self._cgroups_for(target))  # meanwhile, the code
        try:
            code = await self._show(lz, target, plan)
            directory, joins = await asyncio.shield(made)
        except BaseException:
            made.add_done_callback(self._drop_made)
            raise
        try:
            return lz.fork(code), directory, joins
        except BaseException:
            if directory:
                self.placement.drop_tree(directory)
            raise

    def _drop_made(self, made: asyncio.Future[tuple[str, list[str]]]) -> None:
        """Cgroups made for a start that failed: removed by the next sweep."""
        if not made.cancelled() and made.exception() is None and made.result()[0]:
            self.placement.drop_tree(made.result()[0])

    async def _layer_for(
        self, target: Target, plan: SandboxPlan | None, key: LayerKey
    ) -> LayerZygote | None:
        """A new layer zygote for `key`, one however many starts ask at once; None: no room,
        or one failed for it lately, or this one could not be started."""
        starting = self._layer_starts.get(key)
        if starting is None:
            now = asyncio.get_running_loop().time()
            if self.layers.backing_off(key, now):
                return None
            if not self.room_for_layer(target):  # first: room made for nothing is lost
                return None
            if not self.layers.make_room(len(self._layer_starts)):
                return None
            starting = asyncio.get_running_loop().create_task(self._start_layer(target, plan, key))
            self._layer_starts[key] = starting
            starting.add_done_callback(lambda t: self._layer_started(key, t))
        try:
            return await asyncio.shield(starting)
        except Exception as exc:  # the root zygote is gone, or stopping: the usual start
            log.warning("no layer zygote for %s: %s", target.label, exc)
            return None

    def _layer_started(self, key: LayerKey, task: asyncio.Task[LayerZygote]) -> None:
        self._layer_starts.pop(key, None)
        if not task.cancelled() and task.exception() is not None:  # seen, and backed off
            self.layers.failed(key, asyncio.get_running_loop().time())

    async def _start_layer(
        self, target: Target, plan: SandboxPlan | None, key: LayerKey
    ) -> LayerZygote:
        names = await asyncio.to_thread(preload_names, target)
        slug = f"layer.{target.namespace}.{target.function}"  # not a revision's: tools tell
        # Its own import, one function zygote's import before the server moves it out, and
        # that zygote's first instances before they are moved (PRE_MOVE_CAP_MB).
        zygote_mb = 2 * target.spec.memory + PRE_MOVE_CAP_MB
        sock, directory = await self._blank(target, plan, slug, zygote_mb)
        lz = LayerZygote(sock, key, target)
        lz.cgroup_dir = directory
        lz.preload = names
        self.layers.add(lz, self._layer_gone)
        lz.channel.send(
            SpawnLayerZygote(
                label=lz.label,
                layer_dir=target.layer_dir,
                preload=names,
                env=function_env(target),
                init_timeout=self.config.init_timeout,
                network=target.spec.network,
                sandbox=plan,
            )
        )
        log.info("layer zygote of %s started, preloading %s", lz.label, ", ".join(names) or "-")
        return lz

    def _layer_gone(self, lz: LayerZygote) -> None:
        for showing in lz.shown.values():
            showing.cancel()
        if lz.cgroup_dir and self.placement.cgroups is not None:
            self.placement.drop_tree(lz.cgroup_dir)

    async def _show(self, lz: LayerZygote, target: Target, plan: SandboxPlan | None) -> str:
        """The revision's code in the layer zygote's sandbox, mounted there once (starts of
        one revision at once share the mount)."""
        if plan is None:  # no sandbox: where it is
            return target.code_dir
        name = target.sha256[:32]
        showing = lz.shown.get(name)
        if showing is None:
            showing = asyncio.ensure_future(self.root.mount_code(lz.pidfd, target.code_dir, name))
            lz.shown[name] = showing
            showing.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.shield(showing)
        except Exception:
            if lz.shown.get(name) is showing:
                del lz.shown[name]  # the next start tries again
            raise
        return f"{sandbox_code_dir}/{name}"

    async def _cgroups_for(self, target: Target) -> tuple[str, list[str]]:
        """Cgroups for a zygote forked from a layer zygote: their name and what it joins."""
        cgroups = self.placement.cgroups
        if cgroups is None:
            return "", []
        directory = f"{target.slug}.{secrets.token_hex(3)}"
        if self.probe.mode != "root":
            await self.placement.run(cgroups.parent_for_instances, directory)
            return directory, []
        spec = target.spec
        joins = await self.placement.run(
            cgroups.revision, directory, _zygote_mb(target), spec.pids, spec.cpu
        )
        return directory, joins

    async def _join(self, zygote: FunctionZygote, joins: list[str]) -> None:
        cgroups = self.placement.cgroups
        try:
            pid = await zygote.started
        except asyncio.CancelledError:
            return
        assert cgroups is not None
        for procs in joins:
            try:
                await self.placement.run(cgroups.move, procs, pid)
            except OSError as exc:  # it exited meanwhile
                log.debug("zygote of %s not moved: %s", zygote.target.label, exc)
                return

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
            binds=list(target.binds),
        )
