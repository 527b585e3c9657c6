"""What happens after an attempt, as pure functions of the function's `async:` settings, the
invocation, what the attempt answered, the time and a random draw (for the jitter)."""

from __future__ import annotations

import email.utils
import math
from typing import NamedTuple

from ember.queue.base import DEAD, EXPIRED, FAILED, QUEUED, SUCCEEDED, Invocation
from ember.spec import AsyncSpec, BackoffSpec

CRASHES = frozenset({"crashed", "memory_limit"})  # Ember's codes: the instance died
MAX_RETRY_AFTER = 24 * 3600.0


class Step(NamedTuple):
    status: str  # queued (a retry at `not_before`), succeeded, failed, dead or expired
    not_before: float
    reason: str


def outcome(status: int, error: str) -> str:
    """How an attempt ended: ok, error (the function's 4xx), 5xx, 429, timeout or crash."""
    if error == "timeout":
        return "timeout"
    if error in CRASHES:
        return "crash"
    if status < 400:
        return "ok"
    if status == 429:
        return "429"
    if status >= 500:
        return "5xx"
    return "error"


def retried(spec: AsyncSpec, kind: str, status: int) -> bool:
    """Whether `retry_on` names this outcome: "5xx" takes every status from 500 (so Ember's
    own 502 for a crash and 504 for a timeout too), a number takes that status."""
    for rule in spec.retry_on:
        if rule == kind or (rule == "5xx" and status >= 500) or rule == str(status):
            return True
    return False


def backoff(spec: BackoffSpec, retry: int, draw: float) -> float:
    """Seconds before retry number `retry` (1, 2, ...): exponential, capped, jittered down."""
    growth = (retry - 1) * math.log(spec.factor) if spec.factor > 1 else 0.0
    if spec.initial <= 0 or growth >= math.log(spec.max / spec.initial):
        wait = spec.max  # (compared as logarithms: factor ** (retry - 1) may not fit a float)
    else:
        wait = min(spec.initial * spec.factor ** (retry - 1), spec.max)
    return wait * (1.0 - spec.jitter * draw)


def retry_after(value: bytes | None, now: float) -> float | None:
    """`Retry-After`: seconds, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(when - now, 0.0), MAX_RETRY_AFTER)


def expired(spec: AsyncSpec, inv: Invocation, now: float) -> bool:
    return now > inv.accepted + spec.max_age


def after(
    spec: AsyncSpec,
    inv: Invocation,
    kind: str,
    status: int,
    asked_wait: float | None,
    now: float,
    draw: float,
) -> Step:
    """The invocation's next step once its latest attempt (already in `inv.attempts`) ended
    as `kind` with `status`; `asked_wait` is the answer's Retry-After."""
    if kind == "ok":
        return Step(SUCCEEDED, 0.0, "")
    what = f"attempt {len(inv.attempts)} ended {kind} (status {status})"
    if not retried(spec, kind, status):
        return Step(FAILED, 0.0, f"{what}, which async.retry_on does not retry")
    used = inv.counted_attempts
    if used > spec.retries:
        return Step(DEAD, 0.0, f"{what}: no retries left (async.retries: {spec.retries})")
    wait = backoff(spec.backoff, used, draw)
    if asked_wait is not None:
        wait = max(wait, asked_wait)
    if now + wait > inv.accepted + spec.max_age:
        return Step(
            DEAD, 0.0, f"{what}: the next retry would come after async.max_age ({spec.max_age:g} s)"
        )
    return Step(QUEUED, now + wait, "")


def expiry(spec: AsyncSpec) -> Step:
    return Step(EXPIRED, 0.0, f"not run: older than async.max_age ({spec.max_age:g} s)")
