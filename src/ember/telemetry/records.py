"""Records the data plane produces and the store keeps."""

from __future__ import annotations

import msgspec


class ActivationRecord(msgspec.Struct, frozen=True, gc=False):
    id: str  # the request id
    function: str
    revision: int
    start: float  # unix time the request arrived
    duration_ms: float
    status: int
    tier: str  # warm | spare | fork | specialize | fresh | none (never reached an instance)
    instance: str
    peak_memory_kb: int
    billed_ms: int
    error: str | None = None
    attempt: int = 0  # of an async invocation (1, 2, ...); 0: a synchronous request
    call_id: str = ""  # the async invocation's id (X-Call-Id)


class LogRecord(msgspec.Struct, frozen=True, gc=False):
    ts: float
    function: str
    revision: int
    request_id: str
    instance: str
    stream: str  # stdout | stderr | log | system
    message: str
    id: int = 0  # assigned by the store
