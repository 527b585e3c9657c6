"""In-memory buffers between the hot path and the store, drained in batches by the server.

Log output is bounded in bytes, never by trusting tenant code (docs/observability.md, "Log
budget"). Between two drains (a *window*: the server drains every `flush_interval`):

* each function may buffer `function_bytes` and all functions together `total_bytes`; lines with
  no request id (threads, `on_fork` hooks, module code) count like any other; what does not fit
  is cut or dropped, and the drain appends one "[ember] N bytes of output dropped" line per
  function that lost output;
* each invocation keeps at most `log_bytes_per_invocation` in all (across windows); the rest is
  reported in one line when its activation record arrives.

A line costs its UTF-8 bytes (text, request id, stream) plus `LINE_OVERHEAD` for the record
itself, so a flood of tiny lines is bounded too. Per-invocation counts live in an LRU of
`tracked_ids` entries: ids that never get an activation record (forged, output after the
result) fall out of it instead of staying forever.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque

import msgspec

from ember.errors import UserError
from ember.telemetry.records import ActivationRecord, LogRecord

MAX_ACTIVATIONS = 200_000  # records kept if the store falls behind; older ones are dropped
MAX_ERROR_CHARS = 200  # an activation's error is a type name or code, set by the instance
LINE_OVERHEAD = 200  # bytes a buffered line costs besides its strings (measured: ~190)
MAX_TRACKED_ID = 64  # longer request ids are not Ember's (32 hex digits): no per-id count


class LogBudget(msgspec.Struct, frozen=True, kw_only=True):
    """What tenant output may hold in the server between two drains to the store."""

    function_bytes: int = 2 * 1024 * 1024  # per function and window: 4 MiB/s at 0.5 s
    total_bytes: int = 32 * 1024 * 1024  # all functions together per window
    tracked_ids: int = 16_384  # invocations whose output is counted against their cap

    def validate(self) -> LogBudget:
        for key, value in msgspec.structs.asdict(self).items():
            if value <= 0:
                raise UserError(f"log budget: {key}={value!r} must be > 0", code="bad_config")
        if self.total_bytes < self.function_bytes:
            raise UserError(
                f"log budget: total_bytes={self.total_bytes} must be >= "
                f"function_bytes={self.function_bytes}",
                code="bad_config",
            )
        return self


class BufferStats(msgspec.Struct, frozen=True):
    activations: int  # waiting for the next drain
    log_lines: int
    log_bytes: int  # charged against the budget in the current window
    tracked_ids: int  # invocations with a per-invocation count
    dropped_bytes: int  # since the server started, for any cap


class _Window:
    """One function's output since the last drain."""

    __slots__ = ("dropped", "full", "revision", "room")

    def __init__(self, room: int) -> None:
        self.room = room  # bytes it may still buffer
        self.dropped = 0  # bytes of output that did not fit
        self.full = False  # some of it because the server-wide budget was spent
        self.revision = 0


class _Usage:
    """One invocation's output so far: kept, and dropped past the per-invocation cap."""

    __slots__ = ("dropped", "instance", "revision", "used", "window")

    def __init__(self, revision: int, instance: str, window: int) -> None:
        self.used = 0
        self.dropped = 0
        self.revision = revision
        self.instance = instance
        self.window = window  # the last window it logged in: the LRU is kept per window


class TelemetryBuffer:
    """Activation records and log lines waiting to be written, within the log budget."""

    def __init__(self, log_bytes_per_invocation: int, budget: LogBudget | None = None) -> None:
        self.cap = log_bytes_per_invocation
        self.budget = (budget or LogBudget()).validate()
        self.activations: deque[ActivationRecord] = deque(maxlen=MAX_ACTIVATIONS)
        self.logs: list[LogRecord] = []
        self._windows: dict[str, _Window] = {}  # function -> this window's output
        self._room = self.budget.total_bytes  # bytes all functions may still buffer
        self._ids: OrderedDict[tuple[str, str], _Usage] = OrderedDict()  # (function, id), LRU
        self._window = 0  # drains so far
        self._dropped_total = 0

    def log(self, rec: LogRecord) -> None:
        """Called for every output frame: a few dict operations unless something is cut."""
        text, rid, stream = rec.message, rec.request_id, rec.stream
        if text.isascii() and rid.isascii() and stream.isascii():  # O(1) in CPython
            size, cost = len(text), LINE_OVERHEAD + len(rid) + len(stream)
        else:
            size, cost = _utf8(text), LINE_OVERHEAD + _utf8(rid) + _utf8(stream)
        want = size  # what the invocation's cap lets through
        usage = key = None
        if rid and len(rid) <= MAX_TRACKED_ID:
            key = (rec.function, rid)
            usage = self._ids.get(key)
            room = self.cap if usage is None else self.cap - usage.used
            if size > room:
                want = room
            if usage is not None:
                if usage.window != self._window:
                    usage.window = self._window
                    self._ids.move_to_end(key)
                if want <= 0:
                    usage.dropped += size
                    self._dropped_total += size
                    return
        window = self._windows.get(rec.function)
        if window is None:
            window = self._windows[rec.function] = _Window(self.budget.function_bytes)
        charge = size + cost
        if want == size and charge <= window.room and charge <= self._room:
            window.room -= charge
            self._room -= charge
            self.logs.append(rec)
            if key is not None:
                (usage or self._track(key, rec)).used += size
            return
        window.full = window.full or self._room < min(want + cost, window.room)
        self._cut(rec, window, usage, key, size, want, cost)

    def _cut(
        self,
        rec: LogRecord,
        window: _Window,
        usage: _Usage | None,
        key: tuple[str, str] | None,
        size: int,
        want: int,
        cost: int,
    ) -> None:
        """Keep what fits of a line: past the invocation's cap is the invocation's loss, past
        the room of the window (the function's or the server's) the window's."""
        room = min(want, window.room - cost, self._room - cost)
        kept = 0
        if room > 0:
            rec, kept = _prefix(rec, room)
            window.room -= kept + cost
            self._room -= kept + cost
            self.logs.append(rec)
            if usage is None and key is not None:
                usage = self._track(key, rec)
            if usage is not None:
                usage.used += kept
        over_cap = size - want if usage is not None else 0
        if over_cap:
            assert usage is not None
            usage.dropped += over_cap
        window.dropped += size - kept - over_cap
        window.revision = rec.revision
        self._dropped_total += size - kept

    def _track(self, key: tuple[str, str], rec: LogRecord) -> _Usage:
        usage = self._ids[key] = _Usage(rec.revision, rec.instance, self._window)
        if len(self._ids) > self.budget.tracked_ids:  # the least recently heard from goes
            (function, rid), old = self._ids.popitem(last=False)
            if old.dropped:
                self.logs.append(self._cap_notice(function, rid, old, time.time()))
        return usage

    def activation(self, rec: ActivationRecord) -> None:
        usage = self._ids.pop((rec.function, rec.id), None)
        if usage is not None and usage.dropped:
            end = rec.start + rec.duration_ms / 1000
            self.logs.append(self._cap_notice(rec.function, rec.id, usage, end, rec.instance))
        if rec.error is not None and len(rec.error) > MAX_ERROR_CHARS:
            rec = msgspec.structs.replace(rec, error=rec.error[:MAX_ERROR_CHARS])
        self.activations.append(rec)

    def drain(self) -> tuple[list[ActivationRecord], list[LogRecord]]:
        """Everything buffered, with one notice per function that lost output; a new window."""
        now = time.time()
        for function, window in self._windows.items():
            if window.dropped:
                self.logs.append(self._window_notice(function, window, now))
        self._windows = {}
        self._room = self.budget.total_bytes
        self._window += 1
        acts, logs = list(self.activations), self.logs
        self.activations.clear()
        self.logs = []
        return acts, logs

    def forget(self, function: str) -> None:
        """Drop what is kept about a removed function ("namespace/name"); its buffered lines
        are still written. Costs a pass over the tracked ids (at most `tracked_ids`)."""
        self._windows.pop(function, None)
        for key in [k for k in self._ids if k[0] == function]:
            del self._ids[key]

    def statistics(self) -> BufferStats:
        return BufferStats(
            activations=len(self.activations),
            log_lines=len(self.logs),
            log_bytes=self.budget.total_bytes - self._room,
            tracked_ids=len(self._ids),
            dropped_bytes=self._dropped_total,
        )

    def _cap_notice(
        self, function: str, rid: str, usage: _Usage, ts: float, instance: str = ""
    ) -> LogRecord:
        return _system(
            function,
            usage.revision,
            ts,
            f"[ember] {usage.dropped} bytes of output dropped: the per-invocation log cap "
            f"is {self.cap} bytes\n",
            rid,
            instance or usage.instance,
        )

    def _window_notice(self, function: str, window: _Window, now: float) -> LogRecord:
        if window.full:
            why = (
                f"the server's log buffer ({self.budget.total_bytes} bytes for all functions "
                "between two writes to the store) was full"
            )
        else:
            why = (
                f"a function may buffer {self.budget.function_bytes} bytes of output between "
                "two writes to the store"
            )
        return _system(
            function,
            window.revision,
            now,
            f"[ember] {window.dropped} bytes of output dropped: {why}, output of threads and "
            "on_fork hooks included; print less, or write bulk data somewhere else than the "
            "logs\n",
        )


def _system(
    function: str, revision: int, ts: float, text: str, rid: str = "", instance: str = ""
) -> LogRecord:
    return LogRecord(
        ts=ts,
        function=function,
        revision=revision,
        request_id=rid,
        instance=instance,
        stream="system",
        message=text,
    )


def _utf8(text: str) -> int:
    """Bytes of `text` in UTF-8, what the store keeps; for ASCII (`isascii()` is O(1) in
    CPython) that is `len(text)`."""
    return len(text.encode("utf-8", "surrogatepass"))


def _prefix(rec: LogRecord, room: int) -> tuple[LogRecord, int]:
    """The record's first `room` bytes (whole characters), and their size."""
    if rec.message.isascii():
        text = rec.message[:room]
    else:
        text = rec.message.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
    return msgspec.structs.replace(rec, message=text), len(text) if text.isascii() else _utf8(text)


def billed_ms(duration_ms: float) -> int:
    """Billed duration: rounded up to the next whole millisecond, as Lambda does since 2020."""
    return max(1, math.ceil(duration_ms))
