"""Fork start: HTTP in → response out when the pool has no instance and the zygote is warm.

Measured twice: back to back (the next sample right after the pool is empty), and "spaced",
with SPACING seconds of quiet before each request, as on a host where fork starts are sporadic.
They differ because moving a process into a memory cgroup waits for an RCU grace period when
no other cgroup migration happened in the last few tens of milliseconds (see docs/performance.md).

Baselines in the same run: a warm request to bare uvicorn serving the same handler (what the
request costs without any start), and a fresh `python` process importing and calling the
handler (the cold-start anchor a platform without zygotes pays at least).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from bench.client import KeepAlive
from bench.common import FUNCTIONS, PYTHON, Row, latency_row, log, report, summary, verdict
from bench.servers import Baseline, Ember

# (function, fork samples, spaced samples, fresh-process samples, target p50 ms, p99 ms)
CASES: list[tuple[str, int, int, int, float, float | None]] = [
    ("noop", 200, 40, 10, 3.0, 10.0),
    ("numpy_pandas", 100, 20, 5, 10.0, None),
]
WARMUP = 5
SPACING = 0.1


def fork_samples(ember: Ember, name: str, n: int, spacing: float = 0.0) -> tuple[list[float], int]:
    """n fork-start latencies (ms); samples whose header is not `fork` are dropped and counted."""
    client = KeepAlive(ember.port)
    samples: list[float] = []
    dropped = 0
    try:
        for i in range(n + WARMUP):
            ember.drain(name)
            time.sleep(spacing)
            got = client.get(f"/fn/{name}")
            if got.status != 200 or got.tier != "fork":
                dropped += 1
            elif i >= WARMUP:
                samples.append(got.ms)
    finally:
        client.close()
    return samples, dropped


def warm_samples(port: int, name: str, n: int) -> list[float]:
    client = KeepAlive(port)
    try:
        for _ in range(WARMUP):
            client.get(f"/fn/{name}")
        return [client.get(f"/fn/{name}").ms for _ in range(n)]
    finally:
        client.close()


def fresh_process_samples(name: str, n: int) -> list[float]:
    """A new interpreter that imports the handler and calls it once (no HTTP at all)."""
    code = "import handler; handler.handle(None, None)"
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([PYTHON, "-c", code], cwd=FUNCTIONS / name, check=True)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _judged(fn: str, what: str, values: list[float], p50: float, p99: float | None) -> Row:
    s = summary(values)
    target, ok = f"p50 <= {p50:g}", verdict(s["p50"], p50, unit=" ms")
    if p99 is not None:
        target += f", p99 <= {p99:g}"
        p99_ok = verdict(s["p99"], p99, unit=" ms")
        if p99_ok != "ok":
            ok = f"p99 {p99_ok}" if ok == "ok" else f"p50 {ok}; p99 {p99_ok}"
    return latency_row(fn, what, values, target, ok)


def run(scale: float = 1.0) -> dict[str, Any]:
    rows: list[Row] = []
    dropped: dict[str, int] = {}
    names = [case[0] for case in CASES]
    with Ember() as ember, Baseline(*names) as bare:
        for function, n_fork, n_spaced, n_fresh, p50_goal, p99_goal in CASES:
            name = ember.deploy(function)["name"]
            n, n_sp = max(10, int(n_fork * scale)), max(5, int(n_spaced * scale))
            log(f"fork start {name}: {n} back to back, {n_sp} {SPACING:g} s apart")
            forks, dropped[name] = fork_samples(ember, name, n)
            rows.append(_judged(name, "ember fork start, back to back", forks, p50_goal, p99_goal))
            spaced, dropped[f"{name} spaced"] = fork_samples(ember, name, n_sp, SPACING)
            what = f"ember fork start, {SPACING:g} s apart"
            rows.append(_judged(name, what, spaced, p50_goal, p99_goal))
            rows.append(latency_row(name, "ember warm", warm_samples(ember.port, name, 200)))
            rows.append(
                latency_row(name, "uvicorn warm (baseline)", warm_samples(bare.port, name, 200))
            )
            fresh = fresh_process_samples(function, max(3, int(n_fresh * scale)))
            rows.append(latency_row(name, "fresh python process (anchor)", fresh))
    return report("fork_start", rows, dropped_not_fork=dropped)


if __name__ == "__main__":
    run()
