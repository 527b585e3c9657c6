"""The server's handle on one instance: its socket, its in-flight invocations, its fate."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import msgspec

from ember.errors import EmberError
from ember.wire.frames import FrameDecoder, frame
from ember.wire.messages import InstanceMessage, Log, Result, Shutdown

if TYPE_CHECKING:
    from ember.pool.call import Call

log = logging.getLogger("ember.pool")
Settle = Callable[["Call", Result | None, BaseException | None], None]


def _unowned(call: Call, result: Result | None, error: BaseException | None) -> None:
    raise RuntimeError(f"instance got a call ({call.msg.id}) before a pool owned it")


class Instance(asyncio.Protocol):
    """Speaks frames with one instance process over a stream socket."""

    def __init__(
        self,
        instance_id: str,
        concurrency: int,
        on_log: Callable[[Instance, Log], None],
        on_lost: Callable[[Instance], None],
    ) -> None:
        self.id = instance_id
        self.concurrency = concurrency
        self.cgroup = ""  # cgroup.procs of its memory cgroup, once the pool has placed it
        self.placed: asyncio.Future[None] | None = None
        self.pid_known: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pid = 0
        self.inflight: dict[str, Call] = {}  # sent, no result yet; by request id
        self.idle_since = time.monotonic()
        self.reserved = 0  # handed out by the pool, call() not made yet
        self.calls = 0  # requests sent to it
        self.peak_kb = 0  # its peak RSS, as its last result reported
        self._measured = (-1, 0, 0)  # (calls, kB, peak_kb) when its memory was last measured
        self.listed = False  # in its pool's idle list
        self.dead = False
        self.death: EmberError | None = None  # set when the pool killed it on purpose
        self.exit_status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._on_log = on_log
        self._on_lost = on_lost
        self.settle: Settle = _unowned  # its revision's pool's, once it owns it: a call ended
        self._transport: asyncio.Transport | None = None
        self._frames = FrameDecoder()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(InstanceMessage)
        self._pending_kill = False
        self._pidfd = -1

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            raws = self._frames.feed(data)
        except Exception:
            self.kill()
            return
        for raw in raws:
            try:
                msg = self._decoder.decode(raw)
            except msgspec.DecodeError as exc:  # the function's code wrote to our socket
                log.warning("instance %s sent an invalid frame (%s); killing it", self.id, exc)
                self.kill()
                return
            if type(msg) is Result:
                if msg.max_rss_kb > self.peak_kb:
                    self.peak_kb = msg.max_rss_kb
                call = self.inflight.pop(msg.id, None)
                if call is not None:  # else it ran past its deadline and was ended
                    self.settle(call, msg, None)
            elif isinstance(msg, Log):
                self._on_log(self, msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        self._on_lost(self)

    # -- used by the pool --
    @property
    def busy(self) -> bool:
        """Serving, or promised to a request that is about to call it."""
        return bool(self.inflight or self.reserved)

    @property
    def has_room(self) -> bool:
        return not self.dead and len(self.inflight) + self.reserved < self.concurrency

    def call(self, call: Call) -> None:
        """Send a call reserved for it; `settle` hears of its result (or its loss)."""
        self.inflight[call.msg.id] = call
        self.reserved -= 1
        self.calls += 1
        assert self._transport is not None
        self._transport.write(frame(self._encoder.encode(call.msg)))

    def measured(self, calls: int, kb: int) -> None:
        """Its memory use, measured when it had served `calls` requests."""
        self._measured = (calls, kb, self.peak_kb)

    def rest_kb(self, cap_kb: int, unmeasured_kb: int | None = None) -> int:
        """What it counts at rest: its measured use, plus what its peak RSS grew by in the
        requests it served since (their results report it). Never measured: its peak RSS once
        a result reported it (shared pages included: more than it adds), else
        `unmeasured_kb` or its cap."""
        calls, kb, peak = self._measured
        if kb <= 0:
            if self.peak_kb:
                return min(cap_kb, self.peak_kb)
            return cap_kb if unmeasured_kb is None else min(cap_kb, unmeasured_kb)
        if calls == self.calls:
            return kb
        return min(cap_kb, kb + max(0, self.peak_kb - peak))

    def set_pid(self, pid: int) -> None:
        self.pid = pid
        try:  # signals go through a pidfd: a pid the instance left may be someone else's soon
            self._pidfd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            self._pidfd = -1
        if not self.pid_known.done():
            self.pid_known.set_result(pid)
        if self._pending_kill:
            self.kill()

    def kill(self, reason: EmberError | None = None) -> None:
        if reason is not None and self.death is None:
            self.death = reason
        self.dead = True
        if not self.pid:
            self._pending_kill = True
            return
        if self.exit_status.done():  # reaped already: the pid may belong to someone else now
            return
        try:
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def refuse(self, reason: EmberError) -> None:
        """Its pid cannot be trusted: end it by closing its socket (it exits at EOF), never by
        a signal to a pid it named."""
        self.death = self.death or reason
        self.dead = True
        if not self.pid_known.done():
            self.pid_known.cancel()
        if self._transport is not None:
            self._transport.close()
        if not self.exit_status.done():
            self.exit_status.set_result(-1)

    def close_pidfd(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def stop(self) -> None:
        """Polite stop: the instance exits after the frame; used when it is idle."""
        self.dead = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame(self._encoder.encode(Shutdown())))
            self._transport.close()

    def fail_all(self, error: EmberError) -> None:
        calls = list(self.inflight.values())
        self.inflight.clear()
        for call in calls:
            self.settle(call, None, error)
