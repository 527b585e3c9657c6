"""Fork start: HTTP in → response out when the pool has no instance and the zygote is warm.

Measured twice: back to back (the next sample right after the pool is empty), and "spaced",
with SPACING seconds of quiet before each request, as on a host where fork starts are sporadic.
They differ because moving a process into a memory cgroup waits for an RCU grace period when
no other cgroup migration happened in the last few tens of milliseconds (see docs/performance.md).

Two Ember servers run side by side: as started by default (as root on Linux: with the sandbox, so
instances fork from a zygote inside namespaces, under a seccomp filter, in the revision's cgroups)
and with `--no-sandbox`. Each measurement is taken in ABBA blocks (half the samples on the first
server, then both halves on the second, then the rest on the first), so drift in the machine's
load falls on both alike and the sandbox's cost is a same-run difference.

Baselines in the same run: a warm request to bare uvicorn serving the same handler (what the
request costs without any start), and a fresh `python` process importing and calling the
handler (the cold-start anchor a platform without zygotes pays at least).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from bench.client import KeepAlive
from bench.common import FUNCTIONS, PYTHON, Row, judged_row, latency_row, log, report, summary
from bench.servers import SANDBOX_VARIANTS, Baseline, Ember

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


def abba(
    embers: list[Ember], name: str, n: int, spacing: float = 0.0
) -> tuple[list[list[float]], list[int]]:
    """`fork_samples` on two servers in blocks A B B A, n samples each in all."""
    first, second = n // 2, n - n // 2
    samples: list[list[float]] = [[], []]
    dropped = [0, 0]
    for k, count in ((0, first), (1, first), (1, second), (0, second)):
        got, lost = fork_samples(embers[k], name, count, spacing)
        samples[k] += got
        dropped[k] += lost
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


def _difference(fn: str, what: str, a: list[float], b: list[float]) -> Row:
    sa, sb = summary(a), summary(b)
    return {
        "function": fn,
        "measurement": what,
        "p50_ms": round(sa["p50"] - sb["p50"], 3),
        "p99_ms": round(sa["p99"] - sb["p99"], 3),
    }


def run(scale: float = 1.0) -> dict[str, Any]:
    rows: list[Row] = []
    dropped: dict[str, int] = {}
    modes: dict[str, bool] = {}
    names = [case[0] for case in CASES]
    (label_a, extra_a), (label_b, extra_b) = SANDBOX_VARIANTS
    with (
        Ember(extra_a, label_a) as first,
        Ember(extra_b, label_b) as second,
        Baseline(*names) as bare,
    ):
        embers = [first, second]
        for function, n_fork, n_spaced, n_fresh, p50_goal, p99_goal in CASES:
            deployed = {ember.deploy(function)["name"] for ember in embers}
            (name,) = deployed
            for ember in embers:
                modes[ember.label] = ember.sandboxed(name)
            if modes != {label_a: True, label_b: False}:
                log(f"WARNING: zygotes in the sandbox: {modes} (not root? not Linux?)")
            n, n_sp = max(10, int(n_fork * scale)), max(5, int(n_spaced * scale))
            log(f"fork start {name}: {n} back to back, {n_sp} {SPACING:g} s apart, per server")
            forks, lost = abba(embers, name, n)
            spaced, lost_sp = abba(embers, name, n_sp, SPACING)
            for i, ember in enumerate(embers):
                dropped[f"{name} {ember.label}"] = lost[i]
                dropped[f"{name} {ember.label} spaced"] = lost_sp[i]
            for what, values in (("back to back", forks), (f"{SPACING:g} s apart", spaced)):
                for ember, samples in zip(embers, values, strict=True):
                    label = f"{ember.label} fork start, {what}"
                    rows.append(judged_row(name, label, samples, p50_goal, p99_goal))
                what = f"sandbox cost, {what} ({label_a} minus {label_b})"
                rows.append(_difference(name, what, values[0], values[1]))
            for ember in embers:
                warm = warm_samples(ember.port, name, 200)
                rows.append(latency_row(name, f"{ember.label} warm", warm))
            rows.append(
                latency_row(name, "uvicorn warm (baseline)", warm_samples(bare.port, name, 200))
            )
            fresh = fresh_process_samples(function, max(3, int(n_fresh * scale)))
            rows.append(latency_row(name, "fresh python process (anchor)", fresh))
    return report("fork_start", rows, dropped_not_fork=dropped, sandboxed=modes)


if __name__ == "__main__":
    run()
