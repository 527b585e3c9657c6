"""One request's way through a revision's pool, driven by callbacks rather than a task.

A warm request costs no task, future or timer: `RevisionPool.submit()` hands the `Call` to an
idle instance at once, the instance's protocol settles it when the `Result` frame arrives, and
the caller (its `Caller`) hears of the end from that same callback. Only a request that needs a
start (fork, spare, zygote) runs a task, for the start alone. Deadlines are kept by a sweep
over the revision's calls every `SWEEP` seconds while it has any (`RevisionPool._sweep`), not by a
timer per request: a timeout is noticed up to `SWEEP` late.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING, Protocol

from ember.wire.messages import Invoke, Result

if TYPE_CHECKING:
    from ember.pool.instance import Instance

SWEEP = 0.02  # seconds between two looks at a busy revision's deadlines


class Caller(Protocol):
    """Who hears of a call's end; exactly one of the two is called, once."""

    def resolved(self, result: Result, tier: str, inst: Instance) -> None: ...
    def failed(self, error: BaseException) -> None: ...


class State(enum.Enum):
    NEW = "new"
    WAITING = "waiting"  # in the revision's queue, for a free instance or room to start one
    STARTING = "starting"  # a start runs for it (its own deadline bounds it)
    RUNNING = "running"  # sent to an instance; in its `inflight`
    DONE = "done"


class Call:
    __slots__ = ("caller", "deadline", "inst", "msg", "own_deadline", "state", "tier")

    def __init__(self, msg: Invoke, deadline: float, caller: Caller, own_deadline: bool) -> None:
        self.msg = msg
        self.deadline = deadline  # on the event loop's clock
        self.caller = caller
        self.own_deadline = own_deadline  # the caller's (X-Ember-Timeout), shorter than the code's
        self.state = State.NEW
        self.inst: Instance | None = None
        self.tier = ""


class Awaited:
    """A `Caller` for code that awaits a call (`RevisionPool.invoke`)."""

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[tuple[Result, str, Instance]] = loop.create_future()

    def resolved(self, result: Result, tier: str, inst: Instance) -> None:
        if not self.future.done():
            self.future.set_result((result, tier, inst))

    def failed(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
