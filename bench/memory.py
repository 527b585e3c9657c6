"""Private memory (USS) per idle instance, with the zygotes and bare uvicorn for context.

USS is what a process alone owns: pages it copied on write since the fork plus its own new ones.
Instances are measured right after `scale` (never served) and after serving one request each
(20 concurrent requests to a handler that sleeps, so every instance gets one). The baseline in
the same run is a bare uvicorn process serving the same handler: what a process per function
costs without a zygote to share pages with.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import psutil

from bench.client import Burst
from bench.common import Row, log, report, verdict, wait_for
from bench.servers import Baseline, Ember

MB = 1024 * 1024
USS_TARGET_MB = 5.0
COUNT = 20


def _mem(proc: psutil.Process) -> tuple[float, float, float]:
    info = proc.memory_full_info()
    return info.uss / MB, info.pss / MB, info.rss / MB


def _settled(ember: Ember, name: str, n: int) -> list[psutil.Process]:
    """The n instance processes of NAME, once each is blocked waiting for work."""

    def ready() -> bool:
        procs = ember.instances(name)
        return len(procs) == n and all(p.status() == psutil.STATUS_SLEEPING for p in procs)

    wait_for(ready, 30, f"{n} settled instances of {name}")
    time.sleep(0.2)
    return ember.instances(name)


def _instance_row(what: str, procs: list[psutil.Process], target: bool) -> Row:
    mems = [_mem(p) for p in procs]
    uss = [m[0] for m in mems]
    row: Row = {
        "process": what,
        "n": len(procs),
        "uss_mb_median": round(statistics.median(uss), 2),
        "uss_mb_max": round(max(uss), 2),
        "pss_mb_median": round(statistics.median(m[1] for m in mems), 2),
        "rss_mb_median": round(statistics.median(m[2] for m in mems), 2),
    }
    if target:
        row["target"] = f"USS <= {USS_TARGET_MB:g} MB"
        row["verdict"] = verdict(row["uss_mb_median"], USS_TARGET_MB, unit=" MB")
    return row


def _single_row(what: str, proc: psutil.Process) -> Row:
    uss, pss, rss = _mem(proc)
    return {
        "process": what,
        "n": 1,
        "uss_mb_median": round(uss, 2),
        "pss_mb_median": round(pss, 2),
        "rss_mb_median": round(rss, 2),
    }


def run(scale: float = 1.0) -> dict[str, Any]:
    rows: list[Row] = []
    with Ember() as ember, Baseline("noop") as bare:
        ember.deploy("noop", scale={"max": COUNT})
        ember.deploy("sleepy", scale={"max": COUNT})
        ember.deploy("numpy_pandas", scale={"max": 5})
        log(f"memory: {COUNT} noop instances, {COUNT} after one request, 5 numpy+pandas")
        ember.scale("noop", COUNT)
        fresh = _settled(ember, "noop", COUNT)
        rows.append(_instance_row("noop instance, idle, never served", fresh, True))
        ember.scale("sleepy", COUNT)
        _settled(ember, "sleepy", COUNT)
        burst = Burst(ember.port, COUNT)
        try:
            burst.fire("/fn/sleepy")
        finally:
            burst.close()
        served = _settled(ember, "sleepy", COUNT)
        rows.append(_instance_row("instance, idle after one request", served, True))
        ember.scale("numpy-pandas", 5)
        heavy = _settled(ember, "numpy-pandas", 5)
        rows.append(_instance_row("numpy+pandas instance, idle", heavy, False))
        for name in ("noop", "numpy-pandas"):
            zygote = ember.function_zygote(name)
            if zygote is not None:
                rows.append(_single_row(f"{name} function zygote", zygote))
        rows.append(_single_row("root zygote", ember.root_zygote()))
        rows.append(_single_row("ember server", psutil.Process(ember.pid)))
        bare.http.get("/fn/noop")
        rows.append(_single_row("bare uvicorn serving noop (baseline)", psutil.Process(bare.pid)))
    return report("memory", rows)


if __name__ == "__main__":
    run()
