"""What a revision's pool answers when a request cannot be served: one message per cause,
naming the function, what happened and what to change."""

from __future__ import annotations

import signal

from ember.errors import (
    CapacityError,
    EmberError,
    FunctionCrashed,
    FunctionMemoryExceeded,
    FunctionTimeout,
)
from ember.pool.placement import MemoryVerdict


def crash(function: str, memory_mb: int, verdict: MemoryVerdict, status: int | None) -> EmberError:
    """An instance ended under a request: its memory limit, a signal, or an exit."""
    if verdict.oom_killed:
        peak = verdict.peak_kb // 1024
        return FunctionMemoryExceeded(
            f"function '{function}' exceeded its memory limit of {memory_mb} MB (peak {peak} MB) "
            "and was killed; raise memory: in ember.yaml"
        )
    if status is not None and status < 0:
        what = f"was killed by {signal.Signals(-status).name}"
    elif status is not None:
        what = f"exited with code {status}"
    else:
        what = "exited"
    return FunctionCrashed(
        f"function '{function}' instance {what} while handling the request (a crash, os._exit "
        "or sys.exit); the next request gets a new instance"
    )


def start_timed_out(function: str, timeout: float) -> FunctionTimeout:
    return FunctionTimeout(
        f"function '{function}' timed out after {timeout:g} s while its instance was starting "
        "(slow module import?)"
    )


def queue_full(function: str, scale_max: int, waiting: int) -> CapacityError:
    return CapacityError(
        f"function '{function}' is at scale.max={scale_max} with {waiting} requests waiting; "
        "retry later or raise scale.max",
        headers={"Retry-After": "1"},
    )


def ran_too_long(function: str, timeout: float, caller_deadline: bool) -> FunctionTimeout:
    if caller_deadline:
        what = "the caller's deadline (X-Ember-Timeout) passed while it ran"
    else:
        what = f"it timed out after {timeout:g} s"
    return FunctionTimeout(
        f"function '{function}': {what}, and the request was ended; raise timeout: in "
        "ember.yaml (at most 15m)"
    )


def killed_beside(function: str) -> FunctionCrashed:
    return FunctionCrashed(
        f"function '{function}' instance was killed because another request on it timed out"
    )


def waited_too_long(function: str, scale_max: int) -> FunctionTimeout:
    """A waiter's deadline passed while it was still in the queue."""
    return FunctionTimeout(
        f"function '{function}': the request's deadline passed while it was waiting for "
        f"a free instance (all {scale_max} busy at scale.max); it never ran. Raise "
        "scale.max or timeout: in ember.yaml"
    )
