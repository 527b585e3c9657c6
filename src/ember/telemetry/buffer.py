"""In-memory buffers between the hot path and the store, drained in batches by the server."""

from __future__ import annotations

import math
from collections import deque

from ember.telemetry.records import ActivationRecord, LogRecord

MAX_BUFFERED = 200_000  # records kept if the store falls behind; older ones are dropped


class TelemetryBuffer:
    """Activation records and log lines waiting to be written, with a per-invocation log cap."""

    def __init__(self, log_bytes_per_invocation: int) -> None:
        self.cap = log_bytes_per_invocation
        self.activations: deque[ActivationRecord] = deque(maxlen=MAX_BUFFERED)
        self.logs: deque[LogRecord] = deque(maxlen=MAX_BUFFERED)
        self._used: dict[str, int] = {}  # request id -> bytes of output kept
        self._dropped: dict[str, int] = {}

    def log(self, rec: LogRecord) -> None:
        if not rec.request_id:
            self.logs.append(rec)
            return
        used = self._used.get(rec.request_id, 0)
        room = self.cap - used
        size = len(rec.message)
        if size <= room:
            self._used[rec.request_id] = used + size
            self.logs.append(rec)
            return
        if room > 0:
            self.logs.append(_cut(rec, room))
            self._used[rec.request_id] = self.cap
        self._dropped[rec.request_id] = self._dropped.get(rec.request_id, 0) + size - max(room, 0)

    def activation(self, rec: ActivationRecord) -> None:
        self._used.pop(rec.id, None)
        dropped = self._dropped.pop(rec.id, 0)
        if dropped:
            self.logs.append(
                LogRecord(
                    ts=rec.start + rec.duration_ms / 1000,
                    function=rec.function,
                    revision=rec.revision,
                    request_id=rec.id,
                    instance=rec.instance,
                    stream="system",
                    message=f"[ember] {dropped} bytes of output dropped: "
                    f"the per-invocation log cap "
                    f"is {self.cap} bytes\n",
                )
            )
        self.activations.append(rec)

    def drain(self) -> tuple[list[ActivationRecord], list[LogRecord]]:
        acts, logs = list(self.activations), list(self.logs)
        self.activations.clear()
        self.logs.clear()
        return acts, logs


def _cut(rec: LogRecord, room: int) -> LogRecord:
    return LogRecord(
        ts=rec.ts,
        function=rec.function,
        revision=rec.revision,
        request_id=rec.request_id,
        instance=rec.instance,
        stream=rec.stream,
        message=rec.message[:room],
    )


def billed_ms(duration_ms: float) -> int:
    """Billed duration: rounded up to the next whole millisecond, as Lambda does since 2020."""
    return max(1, math.ceil(duration_ms))
