"""Density: N trivial functions deployed through the API and called once, on one node (issue 9,
item 3). N = 1,000 (with a point at 500 on the way); `--quick`: 100.

python -m bench.density [--quick] [--n N]   (`--n`: N functions, for faster iteration)

One `ember up` with default settings. Before anything else it gets `probe` (bench/functions/noop
with `scale.idle: 1s`) and `warm` (noop with `scale.min: 1`). Then N copies of noop, named
`d0000`, `d0001`, … with `scale.idle: 10m`, are deployed one after another, each with
`POST /api/v1/deploy` and called once right after (`GET /fn/NAME` on a kept-alive connection;
the bundle is packed before the clock starts). Then all N are called a second time, in the same
order: a function is still warm when that call's `X-Ember-Start` is neither `specialize` nor
`fresh` (its zygote was kept).

At each point (0 functions, N/2 in full mode, N, the last after the second calls):
* **the probe's start after idleness**, as bench/idle_start.py measures it (requests SPACING
  seconds apart, every other tier but `warm` counted, one row per tier), against the same
  targets: with N functions it should stay what it is with none;
* **`/metrics`**: its size, and the time to its first byte (the render) and last byte; while it
  is rendered, small requests to `warm` go one after another on another connection (they are
  sent until the first byte arrives): their latency against the same requests with no render
  is the stall. The issue asks for "never stalling requests" without a number; the verdict here
  calls a stall what makes the slowest concurrent request more than STALL_MS slower than the
  slowest quiet one;
* **USS of the process tree**: `memory_full_info().uss` of every process below the root zygote
  (the server and the root zygote are left out), by kind (bench/servers.py `Ember.tree`):
  function zygotes, their instances, keepers, spares; per warm function = the sum over the
  number of function zygotes in the tree (each is a warm function, `probe` and `warm` included).
  The server's own USS and open files are shown beside, not counted.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections import Counter
from typing import Any

import psutil

from bench.client import KeepAlive, overlapped
from bench.common import Row, judged_row, latency_row, log, report, summary, verdict
from bench.idle_start import spaced_samples, start_rows
from bench.servers import Ember

MB = 1024 * 1024
Sections = dict[str, list[Row]]
DEPLOY_CALL_MS = 20.0  # deploy through the API + first call, p50 per function
USS_PER_WARM_MB = 2.5
METRICS_MS = 50.0  # /metrics render (time to first byte), p50
STALL_MS = 5.0
COLD = ("specialize", "fresh")  # tiers of a call that found no zygote
LATENCY, METRICS, MEMORY = "latency", "/metrics", "USS of the process tree"  # report sections
HEAP = "the server's garbage collections and CPU"


def limits(server: int, n: int) -> dict[str, Any]:
    """What bounds how many processes and files one node may hold here; a warning where the
    run may hit it (about 3 processes and 3 descriptors in the server per warm function)."""
    soft, hard = psutil.Process(server).rlimit(psutil.RLIMIT_NOFILE)
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    out = {
        "server_nofile": [soft, hard],
        "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
        "pid_max": pid_max,
        "memory_available_gib": round(psutil.virtual_memory().available / 2**30, 1),
    }
    if 0 <= soft < 3 * n + 256 or pid_max < 3 * n + 1000:
        log(f"WARNING: {n} functions may not fit this machine's limits: {out}")
    return out


def deploy_and_call(ember: Ember, names: list[str]) -> list[dict[str, Any]]:
    """Deploy each of `names` (noop, `scale.idle: 10m`) and call it once, one after another."""
    client = KeepAlive(ember.port)
    out = []
    try:
        for name in names:
            bundle = ember.bundle("noop", name, scale={"idle": "10m"})
            t0 = time.perf_counter()
            ember.post_bundle(name, bundle)
            deployed = time.perf_counter()
            got = client.get(f"/fn/{name}")
            out.append(
                {
                    "deploy_ms": (deployed - t0) * 1000.0,
                    "call_ms": got.ms,
                    "total_ms": (time.perf_counter() - t0) * 1000.0,
                    "tier": got.tier,
                    "status": got.status,
                }
            )
    finally:
        client.close()
    return out


def server_cpu_s(ember: Ember) -> float:
    times = psutil.Process(ember.pid).cpu_times()
    return times.user + times.system


def gc_reading(ember: Ember) -> dict[str, float]:
    """The server's full (generation 2) collections so far, from /metrics (server/heap.py):
    how many, how many held the loop over STALL_MS, the longest. Empty before that existed."""
    text = ember.http.get("/metrics").text
    want = {
        'ember_gc_pause_seconds_count{generation="2"}': "full",
        f'ember_gc_pause_seconds_bucket{{generation="2",le="{STALL_MS / 1000:g}"}}': "short",
        'ember_gc_pause_max_seconds{generation="2"}': "longest_ms",
        "ember_gc_frozen_objects": "frozen",
        "ember_gc_full_collections_total": "unfrozen",
    }
    got: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in want:
            got[want[name]] = float(value)
    if "full" in got:
        got["over_stall"] = got["full"] - got.pop("short", 0.0)
        got["longest_ms"] = round(got.get("longest_ms", 0.0) * 1000, 2)
    return got


def gc_row(label: str, before: dict[str, float], after: dict[str, float]) -> Row:
    """Full collections between two readings; `longest_ms` is the longest since the start."""
    if not after:
        return {"measurement": f"{label}: full collections (not reported by this server)"}
    full = int(after["full"] - before.get("full", 0.0))
    over = int(after["over_stall"] - before.get("over_stall", 0.0))
    return {
        "measurement": f"{label}: full collections on the server",
        "n": full,
        "over_stall": over,
        "longest_ms_since_start": after["longest_ms"],
        "frozen_objects": int(after.get("frozen", 0)),
        "full_with_frozen": int(after.get("unfrozen", 0)),
    }


def deploy_rows(done: list[dict[str, Any]]) -> list[Row]:
    n = len(done)
    tenth = max(1, n // 10)
    total = [d["total_ms"] for d in done]
    first_calls = dict(Counter(d["tier"] for d in done))
    return [
        judged_row("d*", f"deploy + first call, all {n}", total, DEPLOY_CALL_MS, None),
        latency_row("d*", f"deploy + first call, first {tenth}", total[:tenth]),
        latency_row("d*", f"deploy + first call, last {tenth}", total[-tenth:]),
        latency_row("d*", "deploy (API) alone", [d["deploy_ms"] for d in done]),
        latency_row("d*", f"first call alone (tiers {first_calls})", [d["call_ms"] for d in done]),
    ]


def second_calls(ember: Ember, names: list[str]) -> tuple[Row, dict[str, int]]:
    """Call every function again, in order: how many were still warm."""
    client = KeepAlive(ember.port)
    try:
        got = [client.get(f"/fn/{name}") for name in names]
    finally:
        client.close()
    tiers = dict(Counter(g.tier for g in got))
    warm = sum(g.status == 200 and g.tier not in COLD for g in got)
    row = latency_row("d*", f"second call, in order (tiers {tiers})", [g.ms for g in got])
    row.update(
        still_warm=warm,
        target=f"still warm = {len(names)}",
        verdict=verdict(warm, len(names), True, " functions"),
    )
    return row, tiers


def metrics_rows(ember: Ember, point: str, n: int) -> list[Row]:
    quiet_client = KeepAlive(ember.port)
    try:
        quiet = [quiet_client.get("/fn/warm").ms for _ in range(20)]
    finally:
        quiet_client.close()
    auth = ember.http.headers.get("Authorization", "")
    runs = [overlapped(ember.port, "/metrics", "/fn/warm", auth) for _ in range(n)]
    refused = [r.status for r in runs if r.status != 200]
    if refused:
        raise RuntimeError(f"GET /metrics answered {refused}: no render to time")
    render = [r.first_byte_ms for r in runs]
    during = [ms for r in runs for ms in r.during_ms]
    stall = (max(during) if during else 0.0) - max(quiet)
    render_row = judged_row("-", f"{point}: /metrics render (first byte)", render, METRICS_MS, None)
    render_row.update(
        size_kb=round(statistics.median(r.size for r in runs) / 1024, 1),
        last_byte_p50_ms=summary([r.last_byte_ms for r in runs])["p50"],
    )
    during_row = latency_row("warm", f"{point}: request while /metrics renders", during)
    during_row.update(
        stall_ms=round(stall, 3),
        target=f"max <= quiet max + {STALL_MS:g}",
        verdict=verdict(stall, STALL_MS, unit=" ms"),
    )
    return [render_row, during_row, latency_row("warm", f"{point}: same request, quiet", quiet)]


def tree_rows(ember: Ember, point: str, judged: bool) -> list[Row]:
    """USS by kind of process below the root zygote; the sum per warm function (zygote)."""
    kinds = ember.tree()
    uss = {kind: _uss_mb(procs) for kind, procs in kinds.items()}
    warm = len(kinds.get("zygote", [])) or 1
    rows: list[Row] = []
    for kind in sorted(uss):
        values = uss[kind]
        rows.append(
            {
                "measurement": f"{point}: USS of {kind} processes",
                "processes": len(values),
                "uss_mb_total": round(sum(values), 1),
                "uss_mb_median": round(statistics.median(values), 2) if values else 0.0,
                "per_warm_fn_mb": round(sum(values) / warm, 2),
            }
        )
    total = sum(sum(values) for values in uss.values())
    row: Row = {
        "measurement": f"{point}: USS of the tree, per warm function ({warm} zygotes)",
        "processes": sum(len(v) for v in uss.values()),
        "uss_mb_total": round(total, 1),
        "per_warm_fn_mb": round(total / warm, 2),
    }
    if judged:
        row.update(
            target=f"<= {USS_PER_WARM_MB:g} MB",
            verdict=verdict(total / warm, USS_PER_WARM_MB, unit=" MB"),
        )
    server = psutil.Process(ember.pid)
    rows += [
        row,
        {
            "measurement": f"{point}: the server itself (not counted)",
            "processes": 1,
            "uss_mb_total": round(server.memory_full_info().uss / MB, 1),
            "open_files": server.num_fds(),
        },
    ]
    return rows


def point(ember: Ember, label: str, scale: float, judged: bool, into: Sections) -> None:
    """Measure one point (probe starts, /metrics, the process tree) into the three sections."""
    k_probe = 10 if scale >= 1 else 2  # a probe sample costs SPACING seconds
    k_metrics = 5 if scale >= 1 else 3
    log(f"density {label}: {k_probe} probe starts, {k_metrics} /metrics, the process tree")
    before = gc_reading(ember)
    probe = spaced_samples(ember.port, ["probe"] * k_probe)["probe"]
    into[LATENCY] += start_rows("probe", f"{label}: start after idleness", probe)
    into[METRICS] += metrics_rows(ember, label, k_metrics)
    into[HEAP].append(gc_row(f"{label}, probe starts and /metrics", before, gc_reading(ember)))
    into[MEMORY] += tree_rows(ember, label, judged)


def run(scale: float = 1.0, n: int | None = None) -> dict[str, Any]:
    n = n or (1000 if scale >= 1 else 100)
    names = [f"d{i:04d}" for i in range(n)]
    halves = [names[: n // 2], names[n // 2 :]] if scale >= 1 else [names]
    out: Sections = {LATENCY: [], METRICS: [], MEMORY: [], HEAP: []}
    done: list[dict[str, Any]] = []
    with Ember() as ember:
        machine = limits(ember.pid, n)
        ember.deploy("noop", "probe", scale={"idle": "1s"})
        ember.deploy("noop", "warm", scale={"min": 1})
        point(ember, "0 functions", scale, False, out)
        for part in halves:
            log(f"density: deploying and calling {len(part)} functions")
            before, cpu = gc_reading(ember), server_cpu_s(ember)
            done += deploy_and_call(ember, part)
            cpu_ms = (server_cpu_s(ember) - cpu) * 1000.0
            row = gc_row(f"deploying {len(part)} (to {len(done)})", before, gc_reading(ember))
            row["server_cpu_ms_per_deploy"] = round(cpu_ms / len(part), 2)
            out[HEAP].append(row)
            if len(done) < n:
                point(ember, f"{len(done)} functions", scale, False, out)
        second, tiers = second_calls(ember, names)
        out[LATENCY] += [*deploy_rows(done), second]
        point(ember, f"{n} functions", scale, True, out)
    rows = out.pop(LATENCY)
    return report("density", rows, out, functions=n, second_call_tiers=tiers, limits=machine)


def _uss_mb(procs: list[psutil.Process]) -> list[float]:
    out = []
    for proc in procs:
        try:
            out.append(proc.memory_full_info().uss / MB)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    count = int(args[args.index("--n") + 1]) if "--n" in args else None
    run(0.25 if "--quick" in args else 1.0, count)
