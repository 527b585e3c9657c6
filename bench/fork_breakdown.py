"""Where a fork start's and a specialize start's time goes, from timestamps taken inside the
function zygote and the instance (diagnostic; no target of its own).

Uses bench/functions/forkprobe, whose module (imported in the zygote) marks its own import, the
moment before `fork()`, the child's first Python code and the `on_fork` hooks. (The instance's
move into its memory cgroup happens in the server, off the request's path.)
All marks use CLOCK_MONOTONIC, which every process on the host shares, so they line up with the
client's clock. Deployed twice: as is, and importing numpy + pandas (PROBE_IMPORTS).

The probe marks the fork with `os.register_at_fork` hooks, and a function that registers one is
forked with `os.fork()` (ember/runtime/forking.py): these are the phases of that path. A function
without hooks skips CPython's after-fork work (bench/fork_start.py measures that path).

"spaced" fork starts wait SPACING seconds before each request: a host where fork starts are
sporadic, not back to back (the kernel's cgroup migration cost depends on it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from bench.client import KeepAlive
from bench.common import FUNCTIONS, Row, log, report, summary
from bench.servers import Ember
from bench.specialize_start import kill_zygote

SPACING = 0.1
INSTANCE = [
    ("fork() + Python after-fork in the child", "zygote_fork", "child"),
    ("child setup: fds, PDEATHSIG, signals, Instance(), capture, hooks", "child", "hooks"),
    ("serve loop: recv + decode Invoke → handler", "hooks", "handler"),
    ("handler → response read by client", "handler", "done"),
]
PHASES = [  # name, from mark, to mark, which starts have it
    ("request → zygote forks (HTTP, pool, IPC)", "sent", "zygote_fork", "fork"),
    ("request → module import starts (root fork, zygote setup)", "sent", "import_start", "spec"),
    ("the module's own import", "import_start", "import_end", "spec"),
    (
        "import done → zygote forks (gc, ZygoteReady, ForkInstance)",
        "import_end",
        "zygote_fork",
        "spec",
    ),
    *[(name, a, b, "both") for name, a, b in INSTANCE],
    ("total", "sent", "done", "both"),
]


def samples(ember: Ember, name: str, n: int, tier: str, before: Callable[[], None]) -> list[Any]:
    client = KeepAlive(ember.port)
    out = []
    try:
        for i in range(n + 3):
            before()
            got = client.get(f"/fn/{name}")
            if got.status != 200 or got.tier != tier:
                continue
            marks = json.loads(got.body)
            marks.update(sent=got.sent, done=got.sent + got.ms / 1000.0)
            if i >= 3:
                out.append(marks)
    finally:
        client.close()
    return out


def scenarios(ember: Ember, name: str, scale: float, heavy: bool) -> dict[str, list[Any]]:
    n_fork, n_spec = max(10, int((50 if heavy else 100) * scale)), max(5, int(15 * scale))
    log(f"breakdown {name}: {n_fork} fork starts, {n_spec} specialize starts")

    def spaced() -> None:
        ember.drain(name)
        time.sleep(SPACING)

    def cold() -> None:
        ember.drain(name)
        kill_zygote(ember, name)

    out = {"fork": samples(ember, name, n_fork, "fork", lambda: ember.drain(name))}
    if not heavy:
        out[f"fork, {SPACING:g} s apart"] = samples(ember, name, n_fork // 3, "fork", spaced)
    out["specialize"] = samples(ember, name, n_spec, "specialize", cold)
    return out


def run(scale: float = 1.0, extra: list[str] | None = None) -> dict[str, Any]:
    """`extra`: arguments for `ember up`, e.g. ["--no-sandbox"] to compare with the default."""
    results: dict[str, list[Any]] = {}
    with Ember(extra or []) as ember:
        # the heavy variant brings numpy + pandas as the numpy_pandas function does
        heavy = (FUNCTIONS / "numpy_pandas" / "requirements.txt").read_text()
        for name, env in (("forkprobe", {}), ("forkprobe-np", {"PROBE_IMPORTS": "numpy,pandas"})):
            ember.deploy("forkprobe", name, heavy if env else "", **({"env": env} if env else {}))
            for kind, marks in scenarios(ember, name, scale, bool(env)).items():
                results[f"{'noop' if not env else 'numpy+pandas'} {kind}"] = marks
    rows: list[Row] = []
    detail: dict[str, list[dict[str, Any]]] = {}
    for phase, start, end, applies in PHASES:
        row: Row = {"phase (p50 ms)": phase}
        for scenario, marks in results.items():
            is_spec = scenario.endswith("specialize")
            if applies == "both" or (applies == "spec") == is_spec:
                values = [(m[end] - m[start]) * 1000.0 for m in marks if start in m and end in m]
                s = summary(values)
                row[scenario] = s["p50"]
                detail.setdefault(scenario, []).append({"phase": phase, **s})
            else:
                row[scenario] = ""
        rows.append(row)
    return report("breakdown", rows, detail=detail, server=ember.label)


if __name__ == "__main__":
    import sys

    run(extra=sys.argv[1:])  # e.g. python -m bench.fork_breakdown --no-sandbox
