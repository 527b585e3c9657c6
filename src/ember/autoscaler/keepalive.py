"""Which idle instances and zygotes to release, and how many instances to keep warm.

`decide()` is pure: the pool passes what it observes and the time, and applies the decision.
"""

from __future__ import annotations

import msgspec

from ember.spec import ScaleSpec


class PoolView(msgspec.Struct, frozen=True):
    idle: list[tuple[str, float]]  # (instance id, idle since), any order
    busy: int
    starting: int
    waiting: int
    zygote: bool  # a zygote is running (or starting)
    zygote_last_used: float
    retired: bool = False  # no route points here any more


class Decision(msgspec.Struct, frozen=True):
    reap: list[str] = []  # idle instances to stop
    start: int = 0  # instances to start now
    reap_zygote: bool = False


def decide(scale: ScaleSpec, view: PoolView, now: float, zygote_keepalive: float) -> Decision:
    total = len(view.idle) + view.busy + view.starting
    if view.retired:
        reap = [iid for iid, _ in view.idle]
        empty = total - len(reap) == 0
        return Decision(reap=reap, reap_zygote=view.zygote and empty)
    floor = scale.min
    expired = sorted((since, iid) for iid, since in view.idle if now - since >= scale.idle)
    removable = max(0, total - floor)
    reap = [iid for _, iid in expired[:removable]]
    start = max(0, floor - total) if view.waiting == 0 else 0
    remaining = total - len(reap) + start
    reap_zygote = (
        view.zygote
        and remaining == 0
        and floor == 0
        and view.waiting == 0
        and now - view.zygote_last_used >= zygote_keepalive
    )
    return Decision(reap=reap, start=start, reap_zygote=reap_zygote)
