"""What the API answers about functions: bodies built from the pool's statistics and the store."""

from __future__ import annotations

from ember.api import schemas as s
from ember.api.names import Address
from ember.api.revisions import revision_changes
from ember.pool.manager import Pool
from ember.pool.target import Target
from ember.store.base import FunctionRecord, RevisionRecord, Store


def function_info(pool: Pool, address: Address, target: Target) -> s.FunctionInfo:
    """A function's serving revision with its instances, zygote and autoscaler, as the pool
    has them now (the store's timestamps are the caller's to fill in)."""
    counts = s.InstanceCounts()
    zygote = False
    desired, panic, concurrency = 0, False, 0.0
    for st in pool.statistics():
        if st.function == target.qualified:
            counts = s.InstanceCounts(
                idle=counts.idle + st.idle,
                busy=counts.busy + st.busy,
                starting=counts.starting + st.starting,
                waiting=counts.waiting + st.waiting,
            )
            zygote = zygote or (st.zygote == "ready" and st.revision == target.number)
            if not st.retired:
                desired += st.desired
                panic = panic or st.panic
                concurrency += st.concurrency
    windows = pool.keepalive_windows(target.qualified)
    return s.FunctionInfo(
        name=target.function,
        namespace=target.namespace,
        revision=target.number,
        sha256=target.sha256,
        created_at=0.0,
        updated_at=0.0,
        spec=target.spec,
        instances=counts,
        zygote=zygote,
        url=address.url(target.namespace, target.function),
        autoscaler=s.AutoscalerInfo(
            desired=desired,
            panic=panic,
            concurrency=round(concurrency, 3),
            keepalive=f"pre-warm {windows.prewarm:g} s, keep {windows.keepalive:g} s "
            f"({windows.reason})",
        ),
    )


async def revision_infos(store: Store, key: str) -> list[s.RevisionInfo]:
    """Every kept revision, with what changed from the one before and what points at it."""
    fn = await store.function(key)
    records = await store.revisions(key)
    latest = records[-1].number if records else 0
    out = []
    before: RevisionRecord | None = None
    for r in records:
        names = []
        if fn is not None:
            names = [
                f"{a.name} {a.weight}%" if a.weight else a.name
                for a in fn.aliases
                if a.revision == r.number
            ]
        if r.number == latest:
            names.append("latest")
        out.append(
            s.RevisionInfo(
                number=r.number,
                sha256=r.sha256,
                created_at=r.created_at,
                spec=r.spec,
                changes=revision_changes(before, r),
                serving=fn is not None and fn.revision == r.number,
                aliases=names,
            )
        )
        before = r
    return out


def traffic_of(fn: FunctionRecord) -> s.Traffic:
    return s.Traffic(
        serving=fn.revision, previous=fn.previous, aliases=fn.aliases, rollout=fn.rollout
    )
