"""Starting a function zygote on this node: a fork of the root zygote (or the spare zygote,
already in cgroups of its own), the zygote's cgroups, its sandbox plan, and the function's
spec sent on the zygote's own channel.
"""

from __future__ import annotations

import secrets
import socket

from ember.config import ServerConfig
from ember.pool.capabilities import SandboxProbe
from ember.pool.placement import Placement
from ember.pool.root import RootZygote, spec_message
from ember.pool.spares import Spares
from ember.pool.target import Target
from ember.pool.zygote import FunctionZygote
from ember.wire.messages import SandboxPlan

# A new instance is charged to its zygote's cgroup until the server moves it into its own:
# the zygote's limit is `memory` plus this much per instance of `scale.max`, at most the cap.
PRE_MOVE_MB = 4
PRE_MOVE_CAP_MB = 256


class ZygoteStarter:
    def __init__(
        self, config: ServerConfig, root: RootZygote, placement: Placement, spares: Spares
    ) -> None:
        self.config = config
        self.root = root
        self.placement = placement
        self.spares = spares
        self.probe = SandboxProbe("off")  # what the host allows, set when the pool starts

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
        """Fork a zygote-to-be and send it `target`'s spec on its own channel.

        Each zygote gets cgroups of its own (a directory per zygote start, so no name is ever
        reused); its instances' memory leaves go below them. In the root sandbox a spare,
        already placed in cgroups of its own, is used when there is one: it only gets the
        revision's limits (no migration, which can wait out an RCU grace period), and a new
        spare is made in the background.
        """
        plan = self._plan(target)
        cgroups = self.placement.cgroups
        directory = ""
        self.placement.forget_zygote_dirs(target.key)  # their processes died with the zygote
        if cgroups is None:
            sock = self._spawn([], split=False)
        elif plan is None or self.probe.mode != "root":
            # The zygote stays in the server's cgroups; its instances still get memory leaves.
            directory = f"{target.slug}.{secrets.token_hex(3)}"
            await self.placement.run(cgroups.parent_for_instances, directory)
            sock = self._spawn([], split=False)
        else:
            spec = target.spec
            zygote_mb = spec.memory + min(spec.scale.max * PRE_MOVE_MB, PRE_MOVE_CAP_MB)
            spare = await self.spares.take(spec, zygote_mb)
            if spare is not None:
                sock, directory = spare.sock, spare.slug
            else:
                directory = f"{target.slug}.{secrets.token_hex(3)}"
                joins = await self.placement.run(
                    cgroups.revision, directory, zygote_mb, spec.pids, spec.cpu
                )
                sock = self._spawn(joins, split=True)
            self.spares.replenish()
        if directory:
            self.placement.zygote_dir(target.key, directory)
        zygote = FunctionZygote(sock, target)
        zygote.cgroup_dir = directory
        zygote.channel.send(spec_message(target, self.config.init_timeout, plan))
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
            binds=list(target.binds),
        )
