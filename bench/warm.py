"""Warm throughput (`wrk -t2 -c32`) and added latency (1 connection): Ember against two baselines.

Servers, all started in the same run, all answering `{"ok": true}`:
* **plain app** (the headline baseline, bench/plain_app.py): what a user would write instead of
  a function, a plain Starlette app on uvicorn (httptools, uvloop, 1 worker, no access log);
* **same-handler app** (bench/baseline_app.py): the same uvicorn options serving the function's
  own handler module in-process, building Ember's `Request` and `Context` for each call;
* **Ember** as a user runs it: default settings except `scale.min: 2` (issue 9), so two
  instances wait and the pool forks more (up to the default `scale.max`) as the load asks;
* Ember with `scale: {min: 2, max: 32}`: one instance per connection, for comparison.

Each load runs in rounds whose order is reversed every round (A B C D, D C B A, …), so drift in
the machine's load falls on every server alike; a round at 32 connections starts with a 1 s
warm-up of each server (instances forked, caches filled). Requests per second are the mean of
the rounds; p50 and p99 are wrk's, averaged over the rounds. Full: 2 rounds of 5 s; quick: 1 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.client import Load
from bench.common import Row, log, report, verdict
from bench.servers import Baseline, Ember, Plain
from bench.wrk import load

THROUGHPUT_SHARE = 1.0  # of the plain app, wrk -c32 (issue 9)
ADDED_P50_MS = 0.1  # over the plain app, 1 connection (issue 9)
CONNECTIONS = 32
PLAIN, SAME, EMBER, EMBER_32 = (
    "plain Starlette app (baseline)",
    "same-handler app (baseline 2)",
    "ember, defaults + scale.min 2",
    "ember, scale.min 2, scale.max 32",
)

Target = tuple[str, str, int, str]  # what, base URL, port, path


def measure(
    targets: Sequence[Target], conns: int, seconds: float, rounds: int, warm_up: bool = True
) -> dict[str, Load]:
    """wrk against each target, `rounds` times in alternating order; means per target."""
    got: dict[str, list[Load]] = {what: [] for what, *_ in targets}
    for i in range(rounds):
        order = targets if i % 2 == 0 else list(reversed(targets))
        for _what, url, port, path in order if warm_up else ():
            load(url, port, path, conns, 1)  # caches, connections, instances
        for what, url, port, path in order:
            got[what].append(load(url, port, path, conns, seconds))
    return {what: _mean(loads) for what, loads in got.items()}


def _mean(loads: list[Load]) -> Load:
    n = len(loads)
    return Load(
        sum(x.requests_per_s for x in loads) / n,
        sum(x.p50_ms for x in loads) / n,
        sum(x.p99_ms for x in loads) / n,
        sum(x.errors for x in loads),
        loads[0].tool,
    )


def _row(what: str, conns: int, got: Load) -> Row:
    return {
        "server": what,
        "connections": conns,
        "req_per_s": round(got.requests_per_s),
        "p50_ms": round(got.p50_ms, 3),
        "p99_ms": round(got.p99_ms, 3),
        "errors": got.errors,
    }


def throughput_rows(results: dict[str, Load]) -> list[Row]:
    plain, same = results[PLAIN].requests_per_s, results[SAME].requests_per_s
    rows = []
    for what, got in results.items():
        row = _row(what, CONNECTIONS, got)
        if what != PLAIN:
            row["x_plain"] = f"{got.requests_per_s / plain:.2f}x"
        if what not in (PLAIN, SAME):
            row["x_same_handler"] = f"{got.requests_per_s / same:.2f}x"
        if what == EMBER:  # the setting; the scale.max 32 row is for comparison
            row["target"] = f">= {THROUGHPUT_SHARE:g}x plain"
            share = got.requests_per_s / plain
            row["verdict"] = verdict(share, THROUGHPUT_SHARE, True, "x")
        rows.append(row)
    return rows


def latency_rows(results: dict[str, Load]) -> list[Row]:
    plain = results[PLAIN].p50_ms
    rows = []
    for what, got in results.items():
        row = _row(what, 1, got)
        if what != PLAIN:
            row["added_p50_ms"] = round(got.p50_ms - plain, 3)
        if what == EMBER:
            row["target"] = f"added p50 <= {ADDED_P50_MS:g} ms"
            row["verdict"] = verdict(got.p50_ms - plain, ADDED_P50_MS, unit=" ms")
        rows.append(row)
    return rows


def run(scale: float = 1.0) -> dict[str, Any]:
    rounds = 2 if scale >= 1 else 1
    seconds = max(1.0, round(5 * scale))
    with Ember() as ember, Plain() as plain, Baseline("noop") as same:
        ember.deploy("noop", scale={"min": 2})
        ember.deploy("noop", "noop-32", scale={"min": 2, "max": 32})
        targets: list[Target] = [
            (PLAIN, plain.url, plain.port, "/fn/noop"),
            (SAME, same.url, same.port, "/fn/noop"),
            (EMBER, ember.url, ember.port, "/fn/noop"),
            (EMBER_32, ember.url, ember.port, "/fn/noop-32"),
        ]
        log(f"warm: {CONNECTIONS} connections, {rounds} x {seconds:g} s per server")
        many = measure(targets, CONNECTIONS, seconds, rounds)
        log(f"warm: 1 connection, {rounds} x {seconds:g} s per server")
        one = measure(targets[:3], 1, seconds, rounds, warm_up=False)
    rows = throughput_rows(many) + latency_rows(one)
    return report("warm", rows, tool=one[PLAIN].tool, rounds=rounds, seconds_per_round=seconds)


if __name__ == "__main__":
    run()
