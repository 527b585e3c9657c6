"""Whether a revision's function zygote should be loaded now.

`zygote_action()` is pure: the pool passes what it observes (the function's keep-alive windows
from its idle-time histogram, `autoscaler/histogram.py`, and how long the function has been
idle) and applies the answer. A zygote that serves instances or requests is always kept.
"""

from __future__ import annotations

import enum

from ember.autoscaler.histogram import Windows, loaded


class Action(enum.Enum):
    NONE = "none"  # nothing to do
    KEEP = "keep"
    RELEASE = "release"  # stop the zygote: its memory goes back to the node
    PREWARM = "prewarm"  # start it ahead of the invocation the histogram expects


def zygote_action(w: Windows, has_zygote: bool, in_use: bool, idle_for: float | None) -> Action:
    """`idle_for`: seconds since the end of the function's last activity (or the zygote's
    start, if later); None when the function was never used since the server started."""
    if in_use:
        return Action.KEEP if has_zygote else Action.NONE
    if idle_for is None:
        return Action.NONE
    if loaded(w, idle_for):
        if has_zygote:
            return Action.KEEP
        # Inside the window the histogram expects the next request: load it ahead of time,
        # whatever stopped it (the policy, or the memory budget: a pre-warm only uses free
        # memory, so it never undoes an eviction another start still needs).
        return Action.PREWARM if w.prewarm > 0 else Action.NONE
    return Action.RELEASE if has_zygote else Action.NONE


def next_edges(w: Windows, idle_for: float) -> list[float]:
    """The idle times (seconds after the end of activity) still ahead at which `loaded(w, …)`
    changes: the start and the end of the window. Until the first of them, or an event that
    changes the inputs, `zygote_action` keeps its answer, so the pool need not ask it."""
    return [edge for edge in (w.prewarm, w.prewarm + w.keepalive) if edge > idle_for]
