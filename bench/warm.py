"""Warm throughput (32 connections) and added latency (1 connection), Ember vs bare uvicorn.

The same no-op handler everywhere. Bare uvicorn is one process on one core calling the handler
inline; Ember is the server process plus instance processes (one request at a time each), so
it is measured with the default `scale.max` (10) and with `scale.max: 32` (one instance per
connection). Pools are scaled to their maximum first, so no request waits for a fork.
"""

from __future__ import annotations

from typing import Any

from bench.common import Row, log, report, verdict
from bench.servers import Baseline, Ember
from bench.wrk import load

THROUGHPUT_SHARE = 0.60
ADDED_P50_MS = 0.5
PATH = "/fn/{}"


def _row(what: str, conns: int, got: Any, bare_rps: float | None = None) -> Row:
    row: Row = {
        "server": what,
        "connections": conns,
        "req_per_s": round(got.requests_per_s),
        "p50_ms": round(got.p50_ms, 3),
        "p99_ms": round(got.p99_ms, 3),
        "errors": got.errors,
    }
    if bare_rps:
        share = got.requests_per_s / bare_rps
        row["share_of_uvicorn"] = f"{share:.0%}"
        row["verdict"] = verdict(share * 100, THROUGHPUT_SHARE * 100, True, " points")
    return row


def run(scale: float = 1.0) -> dict[str, Any]:
    seconds, short = max(2.0, round(10 * scale)), max(2.0, round(5 * scale))
    rows: list[Row] = []
    with Ember() as ember, Baseline("noop") as bare:
        ember.deploy("noop")
        ember.deploy("noop", "noop-32", scale={"max": 32})
        targets = [
            ("uvicorn (baseline)", bare.url, bare.port, "noop"),
            ("ember, scale.max 10 (default)", ember.url, ember.port, "noop"),
            ("ember, scale.max 32", ember.url, ember.port, "noop-32"),
        ]
        ember.scale("noop", 10)
        ember.scale("noop-32", 32)
        for _what, url, port, name in targets:
            load(url, port, PATH.format(name), 32, 1)  # warm-up: caches, instances, JIT-free
        log(f"warm: 32 connections for {seconds:g} s against each of {len(targets)} servers")
        results = {
            what: load(url, port, PATH.format(name), 32, seconds)
            for what, url, port, name in targets
        }
        bare_rps = results["uvicorn (baseline)"].requests_per_s
        for what, got in results.items():
            rows.append(_row(what, 32, got, None if what.startswith("uvicorn") else bare_rps))
        log(f"warm: 1 connection for {short:g} s")
        one_bare = load(bare.url, bare.port, PATH.format("noop"), 1, short)
        one_ember = load(ember.url, ember.port, PATH.format("noop"), 1, short)
    rows.append(_row("uvicorn (baseline)", 1, one_bare))
    added = one_ember.p50_ms - one_bare.p50_ms
    row = _row("ember, scale.max 10 (default)", 1, one_ember)
    row.update(added_p50_ms=round(added, 3), verdict=verdict(added, ADDED_P50_MS, unit=" ms"))
    rows.append(row)
    return report("warm", rows, tool=one_bare.tool)


if __name__ == "__main__":
    run()
