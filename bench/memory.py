"""Private memory (USS) per idle instance, with the zygotes and bare uvicorn for context.

USS is what a process alone owns: pages it copied on write since the fork plus its own new ones.
Instances are measured right after `scale` (never served) and after serving one request each
(20 concurrent requests to a handler that sleeps, so every instance gets one). The baseline in
the same run is a bare uvicorn process serving the same handler: what a process per function
costs without a zygote to share pages with.

Where a warm function's private memory is (as root, which may read /proc/kpagecount): for the
`sleepy` zygote and one of its idle instances after a request, every page mapped by one
process only, by mapping (the interpreter's heap and data stack are anonymous memory;
libpython's data holds its static objects), and how much of the instance's sits at addresses
the zygote holds privately too: a page both wrote since the zygote was forked from the root, so
each holds a copy (a page only the instance wrote is shared by the zygote and the root, and
counts once).
"""

from __future__ import annotations

import os
import statistics
import struct
import time
from collections import Counter
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


_PRESENT, _PFN = 1 << 63, (1 << 55) - 1
PAGE = 4096


def _mapping(name: str, perms: str) -> str:
    if not name:
        return "anonymous (Python heap, data stack)"
    if name.startswith("["):
        return {"[heap]": "malloc heap"}.get(name, name)
    return f"{name.rsplit('/', 1)[-1]} {'data' if 'w' in perms else 'code/read-only'}"


def private_pages(pid: int) -> dict[int, str]:
    """Address -> mapping of every page mapped by `pid` alone (root: /proc/kpagecount)."""
    out: dict[int, str] = {}
    with (
        open(f"/proc/{pid}/maps") as maps,
        open(f"/proc/{pid}/pagemap", "rb") as pagemap,
        open("/proc/kpagecount", "rb") as counts,
    ):
        for line in maps:
            fields = line.split()
            name = fields[5] if len(fields) > 5 else ""
            if name == "[vsyscall]":
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(low // PAGE * 8)
            data = pagemap.read((high - low) // PAGE * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("Q", data)):
                if entry & _PRESENT:
                    counts.seek((entry & _PFN) * 8)
                    if struct.unpack("Q", counts.read(8))[0] == 1:
                        out[low + i * PAGE] = _mapping(name, fields[1])
    return out


def where_rows(zygote: psutil.Process, inst: psutil.Process) -> list[Row]:
    """The zygote's and one idle instance's private pages by mapping, in MB."""
    zp, ip = private_pages(zygote.pid), private_pages(inst.pid)
    both = {a: c for a, c in ip.items() if a in zp}
    rows: list[Row] = []
    for what, pages in (("zygote", zp), ("instance", ip), ("instance, zygote holds too", both)):
        by = Counter(pages.values())
        rows += [
            {"process": what, "mapping": k, "private_mb": round(v * PAGE / MB, 3)}
            for k, v in by.most_common()
            if v * PAGE >= 16 * 1024
        ]
        rows.append(
            {"process": what, "mapping": "all", "private_mb": round(len(pages) * PAGE / MB, 3)}
        )
    return rows


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
        where: list[Row] = []
        sleepy = ember.function_zygote("sleepy")
        if os.geteuid() == 0 and sleepy is not None:  # /proc/kpagecount is root's
            where = where_rows(sleepy, served[0])
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
    return report("memory", rows, sections={"where a warm function's private pages are": where})


if __name__ == "__main__":
    run()
