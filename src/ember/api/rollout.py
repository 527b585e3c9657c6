"""One step of a gradual rollout, as a pure function of its state, what the canary did and
the time; the control plane applies the verdict (traffic and the store) and keeps the loop.

Each step lasts `every` seconds. The canary's 5xx rate is checked on every tick once it has
served `MIN_REQUESTS` in the step (a bad canary goes back at once, not at the step's end);
its p99 at the end of the step. A step in which the canary served nothing moves on: there is
no evidence against it, and a function with little traffic would otherwise never finish.
"""

from __future__ import annotations

import enum

import msgspec

from ember.store.base import Rollout
from ember.telemetry.outcomes import Summary

MIN_REQUESTS = 10  # of the canary in a step before its error rate can fail it early


class Verdict(enum.Enum):
    WAIT = "wait"  # keep the current weights
    ADVANCE = "advance"  # the canary's share grows (the new weight is in the rollout)
    DONE = "done"  # the canary serves everything
    ROLL_BACK = "roll_back"


def step(rollout: Rollout, summary: Summary, now: float) -> tuple[Rollout, Verdict]:
    """`summary` is the canary's outcomes since the step began."""
    if rollout.state != "running":
        return rollout, Verdict.WAIT
    if summary.requests >= MIN_REQUESTS and summary.error_rate > rollout.max_error_rate:
        return _fail(
            rollout,
            summary,
            now,
            f"error rate {summary.error_rate:.1%} of {summary.requests} requests at "
            f"{rollout.weight}% exceeded the {rollout.max_error_rate:.1%} bound",
        )
    if now < rollout.next_at:
        return rollout, Verdict.WAIT
    if summary.requests and summary.error_rate > rollout.max_error_rate:
        return _fail(
            rollout,
            summary,
            now,
            f"error rate {summary.error_rate:.1%} of {summary.requests} requests at "
            f"{rollout.weight}% exceeded the {rollout.max_error_rate:.1%} bound",
        )
    if rollout.max_p99_ms and summary.requests and summary.p99_ms > rollout.max_p99_ms:
        return _fail(
            rollout,
            summary,
            now,
            f"p99 latency {summary.p99_ms:.0f} ms at {rollout.weight}% exceeded the "
            f"{rollout.max_p99_ms:g} ms bound",
        )
    weight = min(100, rollout.weight + rollout.step)
    done = weight >= 100
    advanced = msgspec.structs.replace(
        rollout,
        weight=weight,
        state="done" if done else "running",
        reason=f"every step within bounds; {rollout.to_revision} serves all" if done else "",
        updated_at=now,
        next_at=now + rollout.every,
        requests=rollout.requests + summary.requests,
        errors=rollout.errors + summary.errors,
    )
    return advanced, Verdict.DONE if done else Verdict.ADVANCE


def _fail(rollout: Rollout, summary: Summary, now: float, why: str) -> tuple[Rollout, Verdict]:
    failed = msgspec.structs.replace(
        rollout,
        state="rolled_back",
        reason=f"rolled back to {rollout.from_revision}: {why}",
        updated_at=now,
        requests=rollout.requests + summary.requests,
        errors=rollout.errors + summary.errors,
    )
    return failed, Verdict.ROLL_BACK
