"""Specialize start: the revision has no function zygote (root zygote warm), so the first request
forks a zygote from the root, imports the user's module there, then forks the instance.

Two servers run side by side: Ember as it starts by default (as root on Linux: with the sandbox,
so each new zygote also enters its namespaces, root file system, cgroups and seccomp filter) and
Ember with `--no-sandbox`. Their samples alternate, so the sandbox's cost is a same-run
difference. The function zygote is killed with SIGKILL before each sample. Measured twice: right
after the kill, and with SPACING seconds of quiet first: a process joining a cgroup (as a
sandboxed zygote does before its import) waits for an RCU grace period unless another cgroup
migration happened in the last few tens of milliseconds (see docs/performance.md).

Baselines in the same run: the user's own import time in a fresh interpreter that has already
imported what the root zygote pre-imports (so it is the import the zygote really does), the same
without pre-imports, and bare interpreter startup (`python -c pass`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from bench.client import KeepAlive
from bench.common import (
    FUNCTIONS,
    PYTHON,
    Row,
    latency_row,
    log,
    report,
    summary,
    verdict,
    wait_for,
)
from bench.servers import SANDBOX_VARIANTS, Ember, bench_env, route_name
from ember.bundle import pack

# (function, specialize samples, import samples)
CASES = [("noop", 30, 10), ("numpy_pandas", 15, 5)]
BEYOND_IMPORT_MS = 25.0
# A third server without layer zygotes: numpy + pandas imported by every new zygote.
NO_LAYER_ZYGOTES = ("ember, sandbox, --layer-zygotes 0", ["--layer-zygotes", "0"])
BEYOND_TRIVIAL_MS = 15.0  # numpy + pandas through its layer zygote, beyond noop's specialize
NEW_REVISIONS = 6  # deploys of a new revision (code changed) + first call, per server
SPACING = 0.1  # the second series waits this long before each request, as on a quiet host
TIMER = (
    "import sys, time\n"
    "{pre}"
    "t = time.perf_counter()\n"
    "import handler\n"
    "sys.stdout.write(repr((time.perf_counter() - t) * 1000))\n"
)
ROOT_PREIMPORTS = "import ember.runtime.root\n"


def import_ms(function: str, n: int, preimport: bool) -> list[float]:
    """The handler module's import time in a fresh interpreter (after one unmeasured run)."""
    code = TIMER.format(pre=ROOT_PREIMPORTS if preimport else "")

    def once() -> float:
        done = subprocess.run(
            [PYTHON, "-c", code],
            cwd=FUNCTIONS / function,
            env=bench_env(),
            capture_output=True,
            check=True,
            text=True,
        )
        return float(done.stdout)

    once()
    return [once() for _ in range(n)]


def interpreter_start_ms(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([PYTHON, "-c", "pass"], check=True)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def kill_zygote(ember: Ember, name: str) -> None:
    zygote = ember.function_zygote(name)
    if zygote is not None:
        os.kill(zygote.pid, signal.SIGKILL)
    wait_for(lambda: not ember.info(name)["zygote"], 10, f"{name}'s zygote to be gone")


def specialize_samples(
    embers: list[Ember], name: str, n: int, spacing: float = 0.0
) -> tuple[list[list[float]], list[int]]:
    """n specialize latencies (ms) per server, one server after the other in each round;
    `spacing` seconds of quiet before each request."""
    clients = [KeepAlive(ember.port) for ember in embers]
    samples: list[list[float]] = [[] for _ in embers]
    dropped = [0 for _ in embers]
    try:
        for i in range(n):
            order = range(len(embers)) if i % 2 == 0 else reversed(range(len(embers)))
            for k in order:
                ember, client = embers[k], clients[k]
                ember.drain(name)
                kill_zygote(ember, name)
                time.sleep(spacing)
                got = client.get(f"/fn/{name}")
                if got.status == 200 and got.tier == "specialize":
                    samples[k].append(got.ms)
                else:
                    dropped[k] += 1
    finally:
        for client in clients:
            client.close()
    return samples, dropped


def run(scale: float = 1.0) -> dict[str, Any]:
    rows: list[Row] = []
    dropped: dict[str, int] = {}
    modes: dict[str, bool] = {}
    target = f"p50 - import p50 <= {BEYOND_IMPORT_MS:g}"
    (label_a, extra_a), (label_b, extra_b) = SANDBOX_VARIANTS
    label_c, extra_c = NO_LAYER_ZYGOTES
    p50: dict[tuple[str, str], float] = {}  # (function, server) -> specialize p50, back to back
    with (
        Ember(extra_a, label_a) as first,
        Ember(extra_b, label_b) as second,
        Ember(extra_c, label_c) as third,
    ):
        embers = [first, second, third]
        for function, n_spec, n_imp in CASES:
            deployed = [ember.deploy(function) for ember in embers]
            name = deployed[0]["name"]
            for ember in embers:
                modes[ember.label] = ember.sandboxed(name)
            if modes != {label_a: True, label_b: False, label_c: True}:
                log(f"WARNING: zygotes in the sandbox: {modes} (not root? not Linux?)")
            n = max(5, int(n_spec * scale))
            log(f"specialize start {name}: {n} samples on each of {len(embers)} servers, twice")
            runs = {
                "": specialize_samples(embers, name, n),
                f", {SPACING:g} s apart": specialize_samples(embers, name, n, SPACING),
            }
            imp = import_ms(function, max(3, int(n_imp * scale)), preimport=True)
            for when, (spec, lost) in runs.items():
                for ember, values, gone in zip(embers, spec, lost, strict=True):
                    dropped[f"{name} {ember.label}{when}"] = gone
                    rows.append(latency_row(name, f"{ember.label} specialize start{when}", values))
                    if not when:
                        p50[(function, ember.label)] = summary(values)["p50"]
            rows.append(latency_row(name, "import in fresh python, root pre-imports", imp))
            for when, (spec, _) in runs.items():
                for ember, values in zip(embers, spec, strict=True):
                    if function == "numpy_pandas" and ember is not third:
                        continue  # its layer zygote imported them: no import to be beyond
                    beyond = summary(values)["p50"] - summary(imp)["p50"]
                    what = f"{ember.label} specialize start{when}, beyond own import (p50)"
                    rows.append(
                        {
                            "function": name,
                            "measurement": what,
                            "p50_ms": round(beyond, 3),
                            "target": target,
                            "verdict": verdict(beyond, BEYOND_IMPORT_MS, unit=" ms"),
                        }
                    )
                a, b = summary(spec[0]), summary(spec[1])
                rows.append(
                    {
                        "function": name,
                        "measurement": f"sandbox cost{when} ({label_a} minus {label_b})",
                        "p50_ms": round(a["p50"] - b["p50"], 3),
                        "p99_ms": round(a["p99"] - b["p99"], 3),
                    }
                )
            for ember, dep in zip(embers, deployed, strict=True):
                rows.append(
                    {
                        "function": name,
                        "measurement": f"import measured by zygote at deploy, {ember.label}",
                        "n": 1,
                        "p50_ms": round(dep.get("import_ms") or 0.0, 3),
                    }
                )
            plain = import_ms(function, max(3, int(n_imp * scale)), preimport=False)
            rows.append(latency_row(name, "import in fresh python, nothing pre-imported", plain))
        rows += _layer_rows(p50, label_a, label_c)
        for ember in (first, third):
            values = new_revisions(ember, "numpy_pandas", max(3, int(NEW_REVISIONS * scale)))
            what = f"{ember.label}: deploy (API) of a new revision + first call"
            rows.append(latency_row("numpy-pandas", what, values))
        rows.append(_layer_zygotes(first))
    rows.append(latency_row("-", "python -c pass (interpreter start)", interpreter_start_ms(10)))
    return report("specialize_start", rows, dropped_not_specialize=dropped, sandboxed=modes)


def _layer_rows(p50: dict[tuple[str, str], float], with_lz: str, without: str) -> list[Row]:
    """numpy + pandas through its layer zygote (the default) and without one, each beyond a
    trivial function's specialize start on the same server."""
    rows: list[Row] = []
    for label, target in ((with_lz, BEYOND_TRIVIAL_MS), (without, None)):
        beyond = p50[("numpy_pandas", label)] - p50[("noop", label)]
        row: Row = {
            "function": "numpy-pandas",
            "measurement": f"{label} specialize start, beyond noop's (p50)",
            "p50_ms": round(beyond, 3),
        }
        if target is not None:
            row["target"] = f"<= {target:g} ms"
            row["verdict"] = verdict(beyond, target, unit=" ms")
        rows.append(row)
    return rows


def new_revisions(ember: Ember, function: str, n: int) -> list[float]:
    """Deploy (API) a new revision of `function` (its code changed by a comment, its
    requirements not) and call it: ms each, after one unmeasured."""
    name = route_name(function)
    client = KeepAlive(ember.port)
    out: list[float] = []
    try:
        for i in range(n + 1):
            bundle = ember.bundle(function, name)
            src = ember.tmp / "src" / name / "handler.py"
            src.write_text(src.read_text() + f"# revision {i} {time.time()}\n")
            bundle = pack(src.parent)
            t0 = time.perf_counter()
            ember.post_bundle(name, bundle)
            got = client.get(f"/fn/{name}")
            ms = (time.perf_counter() - t0) * 1000.0
            if got.status != 200:
                raise RuntimeError(f"{name} answered {got.status}")
            if i:
                out.append(ms)
    finally:
        client.close()
    return out


def _layer_zygotes(ember: Ember) -> Row:
    """What the server says of its layer zygotes (their imports, forks)."""
    zygotes = ember.http.get("/api/v1/layers").json()["zygotes"]
    mine = [z for z in zygotes if z["function"] == "numpy-pandas"]
    return {
        "function": "numpy-pandas",
        "measurement": f"{ember.label}: layer zygotes (preloaded, import ms, forks)",
        "n": len(mine),
        "detail": "; ".join(
            f"{z['preload']} {z['import_ms']:.1f} ms, {z['forks']} forks" for z in mine
        ),
    }


if __name__ == "__main__":
    run()
