"""Forks of the root zygote and of function zygotes, without CPython's after-fork work where it
would change nothing.

`os.fork()` runs, around the C library's `fork()`, what a process with other threads needs:
in the child it re-creates the GIL, the import lock and the runtime's locks, drops the other
threads' states, lets `threading` rebuild its bookkeeping, and calls every
`os.register_at_fork` hook (logging and `concurrent.futures` re-create their locks, `random`
reseeds); in the parent it calls the hooks again. A zygote has one thread and holds none of
those locks when it forks, so all of it comes to one thing that matters, `random`'s new seed,
and a lot that costs: it writes pages each fork then copies. Measured on a noop function
called once (its zygote and instance, psutil's USS): 0.45 MB less private memory per warm
function (instance 1.49 → 1.25 MB, zygote 1.21 → 0.99 MB; docs/performance.md).

So a fork here calls the C library's `fork()` through `ctypes.PyDLL` (the GIL stays held across
the call, as in `os.fork()`) and reseeds `random` in the child, unless the process has another
thread or the function's code registered an at-fork hook while it was imported (a tracing
SDK, a connection pool): then it is `os.fork()`, hooks and all, as before (`ForkHooks`).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

_LIBC = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL is held during the call
_fork = _LIBC.fork
_fork.restype = ctypes.c_int
_fork.argtypes = ()


def fork(plain: bool) -> int:
    """Fork; `plain`: without CPython's after-fork work (one thread, no foreign hooks)."""
    if not plain:
        return os.fork()
    pid: int = _fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if pid == 0:
        _child()
    return pid


def single_threaded() -> bool:
    return threading.active_count() == 1


def _child() -> None:
    """What of the after-fork work shows in a process with one thread: `random`'s hook, its
    generator reseeded, so instances of one zygote do not draw the same numbers."""
    rnd = sys.modules.get("random")
    if rnd is not None:
        rnd.seed()


def _reseeds_random(hooks: dict[str, Callable[[], Any]]) -> bool:
    """The hook `random` registers when first imported, which `_child` stands in for."""
    rnd = sys.modules.get("random")
    inst = getattr(rnd, "_inst", None)
    return inst is not None and hooks == {"after_in_child": inst.seed}


class ForkHooks:
    """While active, notes every `os.register_at_fork` call other than `random`'s (and lets
    each through): code that registers one needs `os.fork()` to run it."""

    def __init__(self) -> None:
        self.foreign = 0
        self._original = os.register_at_fork

    def _register(
        self,
        *,
        before: Callable[[], Any] | None = None,
        after_in_parent: Callable[[], Any] | None = None,
        after_in_child: Callable[[], Any] | None = None,
    ) -> None:
        hooks = {
            "before": before,
            "after_in_parent": after_in_parent,
            "after_in_child": after_in_child,
        }
        given = {name: hook for name, hook in hooks.items() if hook is not None}
        if not _reseeds_random(given):
            self.foreign += 1
        self._original(**given)

    def __enter__(self) -> ForkHooks:
        os.register_at_fork = self._register
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        os.register_at_fork = self._original
