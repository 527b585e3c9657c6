"""A sandboxed zygote's parents, from its fork into a pid namespace until it locks itself down.

`sandbox.split` forks the zygote from a *keeper*, which places it in its cgroups, reports and
exits. The root zygote is a child subreaper (`limits.become_subreaper`), so the kernel makes
the zygote its child. Until then the zygote's death signal is a blocked SIGUSR2: the kernel
sends it after reparenting, so it says "the keeper is gone" and kills nothing. Then the zygote
arms SIGKILL and checks that its parent is the root zygote, which it can only read in the
host's /proc (inside its pid namespace `getppid()` is 0 for any parent outside): if the root
died in between, the zygote was reparented further up and must not live on.
"""

from __future__ import annotations

import os
import signal

from ember.runtime import limits

HANDOFF = signal.SIGUSR2


class Lineage:
    """The keeper, the root zygote the zygote is handed to, and the zygote's own `stat` in
    the host's /proc (opened before the zygote's mount namespace hides it)."""

    def __init__(self, keeper: int, reaper: int) -> None:
        self.keeper = keeper
        self.reaper = reaper
        self.stat_fd = os.open("/proc/self/stat", os.O_RDONLY)

    def parent(self) -> int:
        stat = os.pread(self.stat_fd, 1024, 0)
        return int(stat[stat.rindex(b")") + 2 :].split()[1])  # after comm: state, ppid

    def rearm(self) -> bool:
        """Die with the root zygote from now on; False if it is gone already (it died before
        prctl took effect)."""
        limits.set_death_signal(signal.SIGKILL)
        return self.parent() == self.reaper

    def adopted(self) -> str:
        """Once the keeper placed us: wait for its exit, then re-arm on the root zygote; an
        error, or "" when handed over."""
        while self.parent() == self.keeper:  # checked after arming: no exit goes unseen
            if signal.sigtimedwait({HANDOFF}, 10.0) is None:
                return "the keeper did not exit after placing the zygote"
        if not self.rearm():
            return "the root zygote exited while the zygote started"
        signal.sigtimedwait({HANDOFF}, 0)  # taken, if it came after the parent check
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {HANDOFF})
        return ""

    def close(self) -> None:
        os.close(self.stat_fd)


current: Lineage | None = None  # this zygote's, between `watch` and `release`


def watch(keeper: int, reaper: int) -> None:
    """In the zygote, right after the fork (HANDOFF blocked by the keeper before it)."""
    global current
    current = Lineage(keeper, reaper)
    limits.set_death_signal(HANDOFF)  # if the keeper is gone already, `adopted` sees it


def release() -> bool:
    """After a change of credentials cleared the death signal: arm it again on the root
    zygote and forget the host's /proc; False if the root zygote is gone."""
    global current
    if current is None:
        return True
    try:
        return current.rearm()
    finally:
        current.close()  # the host's /proc is not for user code
        current = None
