"""Run every benchmark, print each one's JSON line and table, write bench/results/latest.json.

python -m bench.run_all                  # the full suite (a few minutes)
python -m bench.run_all --quick          # fewer samples, shorter load: a smoke run
python -m bench.run_all --only warm,burst
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from bench import (
    async_invoke,
    autoscale,
    burst,
    cpu_per_request,
    density,
    deps,
    fork_breakdown,
    fork_start,
    idle_start,
    keepalive_sim,
    memory,
    specialize_start,
    triggers_nats,
    warm,
)
from bench.common import RESULTS, log

SUITE: dict[str, Callable[[float], dict[str, Any]]] = {
    "fork_start": fork_start.run,
    "idle_start": idle_start.run,
    "specialize_start": specialize_start.run,
    "breakdown": fork_breakdown.run,
    "warm": warm.run,
    "cpu_per_request": cpu_per_request.run,
    "memory": memory.run,
    "burst": burst.run,
    "autoscale": autoscale.run,
    "keepalive_sim": keepalive_sim.run,
    "density": density.run,
    "deps": deps.run,
    "async_invoke": async_invoke.run,
    "triggers_nats": triggers_nats.run,
}


def _cgroups() -> str:
    v1 = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists() and "memory" in v2.read_text().split():
        return "v2 (memory controller)"
    return "v1 (memory hierarchy)" if v1.exists() else "none"


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("uvicorn", "starlette", "httptools", "uvloop", "msgspec", "numpy", "pandas"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    wrk = shutil.which("wrk")
    return {
        "cpu": model,
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "cgroups": _cgroups(),
        "packages": _versions(),
        "wrk": subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        if wrk
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter runs")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SUITE)}")
    parser.add_argument("--out", default=str(RESULTS / "latest.json"), help="results file")
    args = parser.parse_args(argv)
    chosen = [n for n in args.only.split(",") if n] or list(SUITE)
    unknown = set(chosen) - set(SUITE)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    scale = 0.25 if args.quick else 1.0
    doc: dict[str, Any] = {
        "machine": machine(),
        "started": time.time(),
        "quick": args.quick,
        "results": {},
    }
    t0 = time.perf_counter()
    for name in chosen:
        log(f"--- {name}")
        started = time.perf_counter()
        doc["results"][name] = SUITE[name](scale)
        doc["results"][name]["seconds"] = took = round(time.perf_counter() - started, 1)
        log(f"--- {name}: {took} s")
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    log(f"done in {doc['seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
