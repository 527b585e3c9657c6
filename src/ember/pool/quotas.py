"""A namespace's quotas at the start of an instance: its running instances and their memory.

The quotas are the user's contract, so they count declared memory: every instance (running or
starting) and every zygote at its function's `memory:` (`Occupancy.declared_mb`), whatever
they really use; the spare instance is not one of the function's instances. The node's own
memory budget counts real use instead (budget.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from ember.errors import QuotaReached
from ember.pool.revision import RevisionPool
from ember.pool.target import Target
from ember.spec import Quota


def check_quota(
    quota: Quota | None, target: Target, mine: Sequence[RevisionPool], layers_mb: int = 0
) -> None:
    """Raise 429 when one more instance of `target` would exceed `quota`; `mine`: the revision
    pools of its namespace; `layers_mb`: what its layer zygotes count."""
    if quota is None or not (quota.instances or quota.memory_mb):
        return
    ns = target.namespace
    count = sum(rp.count for rp in mine)
    memory = sum(rp.occupancy.declared_mb() for rp in mine) + layers_mb  # zygotes count too
    if quota.instances and count + 1 > quota.instances:
        raise QuotaReached(
            f"namespace '{ns}' runs {count} instances, its quota max_instances="
            f"{quota.instances}; retry later or raise it (`ember quota set {ns} "
            "--instances N`)",
            headers={"Retry-After": "1"},
        )
    own = next((rp for rp in mine if rp.target.key == target.key), None)
    warm = own is not None and own.zygote is not None and not own.zygote.dead
    needs = target.spec.memory * (1 if warm else 2)
    if quota.memory_mb and memory + needs > quota.memory_mb:
        raise QuotaReached(
            f"namespace '{ns}' instances and zygotes (layer zygotes too) use {memory} MB, "
            "one more instance "
            f"of '{target.function}' needs {needs} MB over its quota "
            f"max_memory={quota.memory_mb} MB; retry later or raise it",
            headers={"Retry-After": "1"},
        )
