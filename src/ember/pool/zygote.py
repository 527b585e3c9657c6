"""The server's handle on one function zygote: readiness, forking instances, reaping reports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable

from ember.errors import DeployRejected, PlatformError
from ember.pool.channel import AsyncChannel
from ember.pool.instance import Instance
from ember.pool.target import Target
from ember.wire.messages import (
    Forked,
    ForkFailed,
    ForkInstance,
    InstanceExited,
    Log,
    Shutdown,
    ZygoteFailed,
    ZygoteMessage,
    ZygoteReady,
    ZygoteStarted,
)


class FunctionZygote:
    def __init__(self, sock: socket.socket, target: Target) -> None:
        self.target = target
        self.ready: asyncio.Future[ZygoteReady] = asyncio.get_running_loop().create_future()
        # Whoever waited may be gone (a start that timed out stopped it): its failure is seen.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.dead = False
        self.pid = 0
        self.cgroup_dir = ""  # its cgroups (below the server's); its instances' leaves go there
        self.last_used = time.monotonic()
        self.measured_kb = 0  # its memory use, once measured (0: not yet)
        self.on_close: Callable[[], None] | None = None  # its pool's, told when it is gone
        self.on_exit: Callable[[], None] | None = None  # its layer zygote's (layer_zygotes.py)
        # Its pid on the host, once it reported it (before its import).
        self.started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._by_id: dict[str, Instance] = {}
        self._by_pid: dict[int, Instance] = {}
        self.channel: AsyncChannel[ZygoteMessage] = AsyncChannel(
            sock, ZygoteMessage, self._on_message, self._on_close
        )

    def _on_message(self, msg: ZygoteMessage, sender: int) -> None:
        if isinstance(msg, Forked):  # sent by the instance: `sender` is its pid on the host
            inst = self._by_id.pop(msg.instance, None)
            if inst is None:
                return
            if not sender:  # a pid said from inside a sandbox is not the host's: never signal it
                inst.refuse(_uncredited(self.target, "instance"))
                return
            self._by_pid[msg.pid] = inst  # InstanceExited names the pid the zygote sees
            inst.set_pid(sender)
        elif isinstance(msg, ForkFailed):
            inst = self._by_id.pop(msg.instance, None)
            if inst is not None:  # the zygote closed its socket: EOF fails it with this cause
                inst.death = PlatformError(
                    f"could not start an instance of '{self.target.label}': fork failed "
                    f"({msg.error}); the host is out of processes or memory, retry later",
                    code="fork_failed",
                    headers={"Retry-After": "1"},
                )
                inst.exit_status.set_result(-1)
                inst.pid_known.cancel()
        elif isinstance(msg, InstanceExited):
            inst = self._by_pid.pop(msg.pid, None)
            if inst is not None and not inst.exit_status.done():
                inst.exit_status.set_result(msg.status)
        elif isinstance(msg, ZygoteStarted):
            if self.pid:  # its first report names it; user code may send more
                return
            if not sender:
                if not self.ready.done():
                    self.ready.set_exception(_uncredited(self.target, "zygote"))
                self.channel.close()
                return
            self.pid = sender
            if not self.started.done():
                self.started.set_result(sender)
        elif isinstance(msg, ZygoteReady):
            if not self.ready.done():
                self.ready.set_result(msg)
        elif isinstance(msg, ZygoteFailed) and msg.platform and not self.ready.done():
            self.ready.set_exception(_platform_failure(self.target, msg))
        elif isinstance(msg, ZygoteFailed) and not self.ready.done():
            self.ready.set_exception(
                DeployRejected(
                    f"function '{self.target.function}' failed to initialise: {msg.error_type}: "
                    f"{msg.message}; fix the module-level code of {self.target.spec.module}.py",
                    detail=msg.traceback + (f"\noutput:\n{msg.output}" if msg.output else ""),
                )
            )

    def _on_close(self) -> None:
        self.dead = True
        if not self.started.done():
            self.started.cancel()
        if self.on_exit is not None:
            self.on_exit()
            self.on_exit = None
        if self.on_close is not None:
            self.on_close()
        if not self.ready.done():
            self.ready.set_exception(
                PlatformError(
                    f"the zygote of '{self.target.label}' exited before it was ready (module "
                    "code that calls os._exit or crashes the interpreter, or a host out of "
                    "memory or processes)"
                )
            )
        for inst in [*self._by_id.values(), *self._by_pid.values()]:
            if not inst.exit_status.done():
                inst.exit_status.set_result(-9)
            if not inst.pid_known.done():
                inst.pid_known.cancel()
        self._by_id.clear()
        self._by_pid.clear()

    async def fork(
        self,
        instance_id: str,
        rlimit_as: int,
        on_log: Callable[[Instance, Log], None],
        on_lost: Callable[[Instance], None],
    ) -> Instance:
        if self.dead:
            raise PlatformError(f"the zygote of '{self.target.label}' is gone")
        inst = Instance(instance_id, self.target.spec.concurrency, on_log, on_lost)
        self._by_id[instance_id] = inst  # before sending: Forked may come back at once
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:  # the channel owns `theirs` from here and closes it once the fd is sent
            self.channel.send(ForkInstance(instance=instance_id, rlimit_as=rlimit_as), theirs)
        except OSError as exc:
            ours.close()
            self._by_id.pop(instance_id, None)
            raise PlatformError(f"the zygote of '{self.target.label}' is gone: {exc}") from exc
        self.last_used = time.monotonic()
        transport, _ = await asyncio.get_running_loop().create_unix_connection(
            lambda: inst, sock=ours
        )
        inst.connection_made(transport)  # uvloop calls it later, on the next loop turn
        return inst

    def stop(self) -> None:
        if not self.ready.done() and self.pid:  # stuck in the user's import: it cannot listen
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        shut_down(self.channel)


def shut_down(channel: AsyncChannel[ZygoteMessage]) -> None:
    """Tell a zygote (or layer zygote) to stop, and close its channel: it exits at EOF."""
    if not channel.closed:
        with contextlib.suppress(OSError):
            channel.send(Shutdown())
        channel.close()


def _platform_failure(target: Target, msg: ZygoteFailed) -> PlatformError:
    if msg.error_type == "ForkFailed":  # the root zygote could not fork: it lives on
        return PlatformError(
            f"could not start a zygote for '{target.label}': fork failed ({msg.message}); "
            "the host is out of processes or memory, retry later",
            code="fork_failed",
            headers={"Retry-After": "1"},
        )
    return PlatformError(
        f"could not start the sandbox of '{target.label}': {msg.message}; see `ember doctor`"
    )


def _uncredited(target: Target, what: str) -> PlatformError:
    return PlatformError(
        f"the {what} of '{target.label}' reported its pid without kernel credentials "
        "(SCM_CREDENTIALS); Ember does not signal a pid it cannot verify, so it was refused"
    )
