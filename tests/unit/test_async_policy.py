"""The retry decisions of async invocations (ember.queue.policy), as pure functions."""

from __future__ import annotations

import email.utils

import pytest

from ember.queue import policy
from ember.queue.base import DEAD, EXPIRED, FAILED, QUEUED, SUCCEEDED, Attempt, Invocation
from ember.spec import AsyncSpec, BackoffSpec


def invocation(*outcomes: str, accepted: float = 1000.0) -> Invocation:
    inv = Invocation(
        id="a" * 32,
        function="default/f",
        method="POST",
        path="/fn/f",
        raw_path="/fn/f",
        query=b"",
        headers=[],
        body=b"",
        accepted=accepted,
    )
    inv.attempts = [Attempt(i + 1, "", 0.0, 1.0, 500, kind) for i, kind in enumerate(outcomes)]
    return inv


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (200, "", "ok"),
        (302, "", "ok"),
        (404, "", "error"),
        (404, "not_found", "error"),
        (429, "", "429"),
        (429, "capacity", "429"),
        (500, "", "5xx"),
        (503, "platform", "5xx"),
        (502, "crashed", "crash"),
        (502, "memory_limit", "crash"),
        (504, "timeout", "timeout"),
    ],
)
def test_outcome_names_how_an_attempt_ended(status: int, error: str, kind: str) -> None:
    assert policy.outcome(status, error) == kind


def test_retry_on_takes_classes_names_and_statuses() -> None:
    default = AsyncSpec()
    assert policy.retried(default, "5xx", 500)
    assert policy.retried(default, "crash", 502)
    assert policy.retried(default, "timeout", 504)
    assert policy.retried(default, "429", 429)
    assert not policy.retried(default, "error", 400)
    only_503 = AsyncSpec(retry_on=("503",))
    assert policy.retried(only_503, "5xx", 503)
    assert not policy.retried(only_503, "5xx", 500)
    assert not policy.retried(only_503, "timeout", 504)
    crashes = AsyncSpec(retry_on=("crash",))
    assert policy.retried(crashes, "crash", 502)
    assert not policy.retried(crashes, "5xx", 502)  # a function's own 502 is not a crash
    assert not policy.retried(AsyncSpec(retry_on=()), "5xx", 500)


def test_backoff_grows_by_its_factor_and_is_always_capped() -> None:
    spec = BackoffSpec(initial=1.0, max=10.0, factor=3.0, jitter=0.0)
    assert [policy.backoff(spec, n, 0.7) for n in (1, 2, 3, 4, 50, 10**6)] == [
        1.0,
        3.0,
        9.0,
        10.0,
        10.0,
        10.0,
    ]
    flat = BackoffSpec(initial=2.0, max=60.0, factor=1.0, jitter=0.0)
    assert policy.backoff(flat, 30, 0.5) == 2.0


def test_jitter_draws_downwards_from_the_wait() -> None:
    spec = BackoffSpec(initial=4.0, max=100.0, factor=2.0, jitter=0.5)
    assert policy.backoff(spec, 2, 0.0) == 8.0
    assert policy.backoff(spec, 2, 1.0) == 4.0
    assert policy.backoff(spec, 2, 0.5) == 6.0
    full = BackoffSpec(initial=4.0, max=100.0, factor=2.0, jitter=1.0)
    assert policy.backoff(full, 1, 1.0) == 0.0


def test_retry_after_reads_seconds_and_dates() -> None:
    assert policy.retry_after(b"7", 0.0) == 7.0
    assert policy.retry_after(b"999999999", 0.0) == policy.MAX_RETRY_AFTER
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True).encode()
    assert policy.retry_after(date, now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True).encode()
    assert policy.retry_after(past, now) == 0.0
    assert policy.retry_after(b"soon", now) is None
    assert policy.retry_after(None, now) is None
    assert policy.retry_after(b"", now) is None


SPEC = AsyncSpec(retries=2, backoff=BackoffSpec(initial=1.0, max=100.0, factor=2.0, jitter=0.0))


def test_success_and_a_refused_outcome_end_it() -> None:
    assert policy.after(SPEC, invocation("ok"), "ok", 200, None, 1000.0, 0.5).status == SUCCEEDED
    step = policy.after(SPEC, invocation("error"), "error", 400, None, 1000.0, 0.5)
    assert step.status == FAILED
    assert "retry_on" in step.reason


def test_retries_come_at_the_backoff_then_the_invocation_is_dead() -> None:
    first = policy.after(SPEC, invocation("5xx"), "5xx", 500, None, 1000.0, 0.0)
    assert (first.status, first.not_before) == (QUEUED, 1001.0)
    second = policy.after(SPEC, invocation("5xx", "5xx"), "5xx", 500, None, 1000.0, 0.0)
    assert (second.status, second.not_before) == (QUEUED, 1002.0)
    third = policy.after(SPEC, invocation("5xx", "5xx", "5xx"), "5xx", 500, None, 1000.0, 0.0)
    assert third.status == DEAD
    assert "no retries left (async.retries: 2)" in third.reason


def test_interrupted_attempts_spend_no_retry() -> None:
    inv = invocation("interrupted", "interrupted", "5xx", "5xx")
    assert inv.counted_attempts == 2
    assert policy.after(SPEC, inv, "5xx", 500, None, 1000.0, 0.0).status == QUEUED


def test_retry_after_lengthens_the_wait_but_never_shortens_it() -> None:
    longer = policy.after(SPEC, invocation("429"), "429", 429, 30.0, 1000.0, 0.0)
    assert longer.not_before == 1030.0
    shorter = policy.after(SPEC, invocation("429"), "429", 429, 0.1, 1000.0, 0.0)
    assert shorter.not_before == 1001.0


def test_a_retry_after_max_age_makes_it_dead_now_and_an_old_one_expires() -> None:
    spec = AsyncSpec(retries=5, max_age=60.0)
    late = policy.after(spec, invocation("5xx", accepted=0.0), "5xx", 500, 120.0, 10.0, 0.0)
    assert late.status == DEAD and "max_age" in late.reason
    assert policy.expired(spec, invocation(accepted=0.0), 60.5)
    assert not policy.expired(spec, invocation(accepted=0.0), 59.5)
    assert policy.expiry(spec).status == EXPIRED
