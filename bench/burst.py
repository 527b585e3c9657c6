"""Burst: 0 → 100 concurrent instances.

`sleepy` (the handler notes time.time() on entry, sleeps 0.5 s, returns it with its pid) with
`scale.max: 100` and no instance. 100 connections are opened and warmed on /healthz first,
then one request is written on each as fast as the client can. The number is the time from the
first request written to the last handler entered; 100 distinct pids prove 100 instances.
Also the control-plane path: `POST .../scale {"instances": 100}` from zero, until the API
answers and until all 100 processes exist and wait for work.

Baseline in the same run: the same 100 concurrent requests against bare uvicorn serving noop
(its whole round trip), i.e. what the client and the HTTP layer alone take.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import psutil

from bench.client import Burst
from bench.common import Row, log, report, verdict, wait_for
from bench.servers import Baseline, Ember

N = 100
TARGET_S = 0.5


def http_burst(ember: Ember) -> tuple[Row, dict[str, Any]]:
    ember.drain("sleepy", 30)
    burst = Burst(ember.port, N)
    try:
        got = burst.fire("/fn/sleepy")
    finally:
        burst.close()
    ok = [r for r in got.responses if r[0] == 200 and r[2] is not None]
    entries = sorted(r[2]["entered"] for r in ok)
    pids = {r[2]["pid"] for r in ok}
    tiers: dict[str, int] = {}
    for r in got.responses:
        tier = r[1].get("x-ember-start", "?")
        tiers[tier] = tiers.get(tier, 0) + 1
    statuses: dict[int, int] = {}
    for r in got.responses:
        statuses[r[0]] = statuses.get(r[0], 0) + 1
    nan = float("nan")
    span = entries[-1] - got.sent_first if entries else nan
    row: Row = {
        "path": f"HTTP: {N} concurrent requests from zero",
        "seconds": round(span, 4),
        "first_handler_s": round(entries[0] - got.sent_first, 4) if entries else nan,
        "median_handler_s": round(statistics.median(entries) - got.sent_first, 4)
        if entries
        else nan,
        "instances": len(pids),
        "ok": len(ok),
        "target": f"<= {TARGET_S:g} s",
        "verdict": verdict(span, TARGET_S, unit=" s"),
    }
    if len(ok) < N:
        failed = next((r[2] for r in got.responses if r[0] != 200), None)
        log(f"burst: only {len(ok)} of {N} ok, statuses {statuses}; first error: {failed}")
    extra = {"tiers": tiers, "statuses": statuses, "client_write_s": got.sent_last - got.sent_first}
    return row, extra


class _ZygoteGone(Exception):
    pass


def api_scale(ember: Ember) -> Row:
    ember.drain("sleepy", 30)
    t0 = time.perf_counter()
    count = ember.scale("sleepy", N)
    answered = time.perf_counter() - t0
    zygote = ember.function_zygote("sleepy")
    assert zygote is not None
    path = f'API: scale {{"instances": {N}}} from zero'

    def all_waiting() -> bool:
        try:
            kids = zygote.children()
            return len(kids) >= N and all(k.status() == psutil.STATUS_SLEEPING for k in kids)
        except psutil.NoSuchProcess:
            if not zygote.is_running():
                raise _ZygoteGone from None
            return False

    try:
        wait_for(all_waiting, 30, f"{N} instances waiting for work")
    except _ZygoteGone:
        log("burst: the zygote died while scaling up (a memory cgroup OOM? see dmesg)")
        return {"path": path, "instances": count, "verdict": "FAILED: the zygote died"}
    ready = time.perf_counter() - t0
    return {
        "path": path,
        "seconds": round(ready, 4),
        "api_answered_s": round(answered, 4),
        "instances": count,
        "target": f"<= {TARGET_S:g} s",
        "verdict": verdict(ready, TARGET_S, unit=" s"),
    }


def baseline_burst(bare: Baseline) -> Row:
    burst = Burst(bare.port, N)
    try:
        got = burst.fire("/fn/noop")
    finally:
        burst.close()
    done = max(r[3] for r in got.responses) - got.sent_first
    return {
        "path": f"uvicorn (baseline): {N} concurrent noop round trips",
        "seconds": round(done, 4),
        "ok": sum(r[0] == 200 for r in got.responses),
    }


def run(scale: float = 1.0) -> dict[str, Any]:
    rounds = max(1, round(3 * scale))
    rows: list[Row] = []
    extra: dict[str, Any] = {}
    with Ember() as ember, Baseline("noop") as bare:
        ember.deploy("sleepy", scale={"max": N})
        log(f"burst: {rounds} round(s) of 0 → {N} over HTTP and over the API")
        for i in range(rounds):
            row, extra[f"http_round_{i}"] = http_burst(ember)
            rows.append(row)
        rows += [api_scale(ember) for _ in range(rounds)]
        rows.append(baseline_burst(bare))
    return report("burst", rows, **extra)


if __name__ == "__main__":
    run()
