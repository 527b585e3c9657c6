"""The benchmarks' pure helpers: wrk's report, verdicts, the process kinds of Ember.tree, and
async_invoke's /metrics parsing and wrk Lua script.

(The benchmarks themselves run whole, with small counts, in CI: `make bench-quick`.)
"""

from __future__ import annotations

import math

import pytest
from bench.async_invoke import (
    WrkRun,
    WrkThread,
    async_counts,
    ended,
    metric_samples,
    queue_depths,
    shares,
    wrk_script,
    wrk_threads,
)
from bench.common import judged_row, percentile, verdict
from bench.servers import kind_by_place
from bench.wrk import parse

WRK = """\
Running 2s test @ http://127.0.0.1:8123/fn/noop
  2 threads and 32 connections
  Latency Distribution
     50%   52.00us
     75%    1.10ms
     90%    2.20ms
     99%    1.05s
  17034 requests in 2.00s, 2.41MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:   8516.53
Transfer/sec:      1.20MB
"""


def test_wrk_report_in_every_unit() -> None:
    load = parse(WRK)
    assert load.requests_per_s == pytest.approx(8516.53)
    assert load.p50_ms == pytest.approx(0.052)
    assert load.p99_ms == pytest.approx(1050.0)
    assert load.errors == 7  # 4 non-2xx + 3 socket errors


@pytest.mark.parametrize(
    ("value", "limit", "higher", "unit", "expected"),
    [
        (2.5, 3.0, False, " ms", "ok"),
        (3.0, 3.0, False, " ms", "ok"),
        (7.9, 3.0, False, " ms", "MISS by 4.9 ms (163%)"),
        (0.46, 1.0, True, "x", "MISS by 0.54x (54%)"),
        (0, 1000, True, " functions", "MISS by 1000 functions (100%)"),
        (math.nan, 1.0, False, "", "n/a"),
    ],
)
def test_verdict(value: float, limit: float, higher: bool, unit: str, expected: str) -> None:
    assert verdict(value, limit, higher, unit) == expected


def test_judged_row_names_each_missed_percentile() -> None:
    values = [1.0] * 98 + [9.0, 9.0]
    assert judged_row("f", "m", values, 3.0, 6.0)["verdict"].startswith("p99 MISS")
    assert judged_row("f", "m", [4.0] * 10, 3.0, 6.0)["verdict"] == "MISS by 1 ms (33%)"
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize(
    ("parent", "kept", "kind"),
    [
        ("zygote", set(), "instance"),
        ("", {"zygote"}, "keeper"),  # one keeper per zygote, or one for many
        ("", {"zygote", "spare zygote"}, "keeper"),
        ("", {"spare zygote"}, "spare zygote"),  # the keeper of a spare counts with it
        ("", set(), "other"),
    ],
)
def test_processkind_by_place(parent: str, kept: set[str], kind: str) -> None:
    assert kind_by_place(parent, kept) == kind


METRICS = """\
# HELP ember_async_queue_depth Async invocations queued
# TYPE ember_async_queue_depth gauge
ember_async_queue_depth{function="noop-burst",namespace="default"} 12.0
ember_async_queue_depth{function="other",namespace="team"} 0.0
# TYPE ember_async_invocations_total counter
ember_async_invocations_total{function="noop-burst",namespace="default",status="accepted"} 3030.0
ember_async_invocations_total{function="noop-burst",namespace="default",status="failed"} 2.0
ember_async_invocations_total{function="noop-burst",namespace="default",status="succeeded"} 3016.0
ember_async_invocations_total{function="other",namespace="team",status="accepted"} 1e+06
ember_async_invocations_totally{function="x",namespace="default",status="accepted"} 5.0
ember_requests_total{function="a \\"quoted\\" name",namespace="default"} 7
"""


def test_metric_samples_by_name_with_escaped_labels() -> None:
    assert metric_samples(METRICS, "ember_requests_total") == [
        ({"function": 'a "quoted" name', "namespace": "default"}, 7.0)
    ]
    assert metric_samples(METRICS, "ember_missing") == []


def test_async_counts_and_depths_per_function() -> None:
    counts = async_counts(METRICS)
    assert counts == {
        "default/noop-burst": {"accepted": 3030, "failed": 2, "succeeded": 3016},
        "team/other": {"accepted": 1_000_000},  # and not the look-alike metric
    }
    assert ended(counts["default/noop-burst"]) == 3018
    assert ended(counts["team/other"]) == 0
    assert queue_depths(METRICS) == {"default/noop-burst": 12, "team/other": 0}


@pytest.mark.parametrize(
    ("total", "parts", "expected"), [(3000, 2, [1500, 1500]), (7, 3, [3, 2, 2]), (1, 2, [1, 0])]
)
def test_shares(total: int, parts: int, expected: list[int]) -> None:
    assert shares(total, parts) == expected
    assert sum(shares(total, parts)) == total


def test_wrk_script_posts_the_body_and_stops_each_thread_at_its_quota() -> None:
    script = wrk_script(
        "POST", b'{"n": 1}\n\\', [("Content-Type", "application/json")], 202, [5, 4]
    )
    assert 'wrk.method = "POST"' in script
    assert 'wrk.body = "{\\034n\\034: 1}\\010\\092"' in script  # Lua decimal escapes
    assert 'wrk.headers["Content-Type"] = "application/json"' in script
    assert "local quotas = {5, 4}" in script
    assert "if status ~= 202 then" in script
    assert "wrk.thread:stop()" in script
    # no quota: a plain timed run (the thread never stops itself)
    assert "local quotas = {}" in wrk_script("POST", b"", [], 200, [])


def test_wrk_thread_lines() -> None:
    output = (
        "Running 1m test @ http://127.0.0.1:1/fn-async/noop\n"
        "bench-thread-done 2\n"
        "bench-thread 1 1502 0 100.250000 100.900000\n"
        "bench-thread 2 1500 3 100.200000 0.000000\n"
    )
    threads = wrk_threads(output)
    assert threads == [
        WrkThread(1, 1502, 0, 100.25, 100.9),
        WrkThread(2, 1500, 3, 100.2, 0.0),
    ]
    run = WrkRun(threads, None, output)
    assert (run.answered, run.unexpected) == (3002, 3)
    start, end = run.span
    assert start == pytest.approx(100.2)
    assert math.isnan(end)  # thread 2 stopped before its quota
    assert WrkRun(threads[:1], None, "").span == pytest.approx((100.25, 100.9))
