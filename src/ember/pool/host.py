"""What a revision's pool needs from the node's pool, and what it reports about itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import msgspec

from ember.pool.instance import Instance
from ember.pool.placement import MemoryVerdict
from ember.pool.target import Target
from ember.pool.zygote import FunctionZygote
from ember.wire.messages import Log

if TYPE_CHECKING:
    from ember.pool.revision import RevisionPool

# Start tiers, as `X-Ember-Start` names them: an idle instance, the spare instance handed
# over (prefork.py), a fork of the warm zygote, a new zygote first, the root zygote too.
WARM, SPARE, FORK, SPECIALIZE, FRESH = "warm", "spare", "fork", "specialize", "fresh"
TIERS = (WARM, SPARE, FORK, SPECIALIZE, FRESH)


class PoolSettings(msgspec.Struct, frozen=True):
    queue_depth: int  # requests that may wait per revision at scale.max
    init_timeout: float  # seconds a module may take to import
    spare_instances: bool = True  # a warm zygote keeps one instance forked ahead (prefork.py)


class PoolHost(Protocol):
    """What a revision's pool asks of the node's pool."""

    def activity(self, target: Target, busy: bool, now: float) -> None: ...
    def check_quota(self, target: Target) -> None: ...
    async def make_room(self, rp: RevisionPool, loop_deadline: float | None) -> None: ...
    def check_prewarm(self, rp: RevisionPool) -> None: ...
    def freed(self) -> None: ...
    def account(self, rp: RevisionPool) -> None: ...  # what it counts in the budget changed
    def spare_fits(self, rp: RevisionPool, kb: int) -> bool: ...  # free memory, no eviction
    def rested(self, rp: RevisionPool) -> None: ...  # measure its idle processes soon
    def wake(self, rp: RevisionPool) -> None: ...  # step its keep-alive at the next tick
    async def start_zygote(self, target: Target) -> tuple[FunctionZygote, bool]: ...
    def rlimit_for(self, memory_mb: int) -> int: ...
    def place(self, inst: Instance, zygote_dir: str, memory_mb: int) -> None: ...
    async def verdict(self, procs: str) -> MemoryVerdict: ...
    def release_cgroup(self, procs: str) -> None: ...
    def instance_log(self, target: Target, instance: str, msg: Log) -> None: ...
    def system_log(self, target: Target, text: str) -> None: ...


class RevisionStats(msgspec.Struct, frozen=True):
    function: str  # "namespace/name"
    revision: int
    idle: int
    busy: int
    starting: int
    waiting: int
    zygote: str  # none | starting | ready
    retired: bool
    starts: dict[str, int]
    zygote_pid: int = 0  # on the host
    memory_mb: int = 0  # per instance
    desired: int = 0  # what the autoscaler last asked for
    panic: bool = False
    concurrency: float = 0.0  # mean over the stable window
    spare: int = 0  # a spare instance is forked and waiting (prefork.py)
    counted_kb: int = 0  # what the node's memory budget counts for it now (budget.py)


class NodeStats(msgspec.Struct, frozen=True):
    """What the node's pool holds, whatever the functions: for /metrics and leak checks."""

    revisions: int  # revision pools (live, standby and draining)
    functions_tracked: int  # functions with keep-alive state (idle times, activity)
    cgroups_pending: int  # cgroup directories waiting for removal
    memory_used_mb: int  # of the node's memory budget: at rest as measured, else at memory:
    memory_budget_mb: int
