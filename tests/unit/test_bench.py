"""The benchmarks' pure helpers: wrk's report, verdicts, and the process kinds of Ember.tree.

(The benchmarks themselves run whole, with small counts, in CI: `make bench-quick`.)
"""

from __future__ import annotations

import math

import pytest
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
