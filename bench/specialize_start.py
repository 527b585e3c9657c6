"""Specialize start: the revision has no function zygote (root zygote warm), so the first request
forks a zygote from the root, imports the user's module there, then forks the instance.

The function zygote is killed with SIGKILL before each sample. Baselines in the same run: the
user's own import time in a fresh interpreter that has already imported what the root zygote
pre-imports (so it is the import the zygote really does), the same without pre-imports, and
bare interpreter startup (`python -c pass`).
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
from bench.servers import Ember, bench_env

# (function, specialize samples, import samples)
CASES = [("noop", 30, 10), ("numpy_pandas", 15, 5)]
BEYOND_IMPORT_MS = 25.0
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


def specialize_samples(ember: Ember, name: str, n: int) -> tuple[list[float], int]:
    client = KeepAlive(ember.port)
    samples: list[float] = []
    dropped = 0
    try:
        for _ in range(n):
            ember.drain(name)
            kill_zygote(ember, name)
            got = client.get(f"/fn/{name}")
            if got.status == 200 and got.tier == "specialize":
                samples.append(got.ms)
            else:
                dropped += 1
    finally:
        client.close()
    return samples, dropped


def run(scale: float = 1.0) -> dict[str, Any]:
    rows: list[Row] = []
    dropped: dict[str, int] = {}
    with Ember() as ember:
        for function, n_spec, n_imp in CASES:
            deployed = ember.deploy(function)
            name = deployed["name"]
            n = max(5, int(n_spec * scale))
            log(f"specialize start {name}: {n} samples")
            spec, dropped[name] = specialize_samples(ember, name, n)
            imp = import_ms(function, max(3, int(n_imp * scale)), preimport=True)
            beyond = summary(spec)["p50"] - summary(imp)["p50"]
            target = f"p50 - import p50 <= {BEYOND_IMPORT_MS:g}"
            rows.append(latency_row(name, "ember specialize start", spec))
            rows.append(latency_row(name, "import in fresh python, root pre-imports", imp))
            rows.append(
                {
                    "function": name,
                    "measurement": "specialize beyond own import (p50)",
                    "p50_ms": round(beyond, 3),
                    "target": target,
                    "verdict": verdict(beyond, BEYOND_IMPORT_MS, unit=" ms"),
                }
            )
            rows.append(
                {
                    "function": name,
                    "measurement": "import measured by zygote at deploy",
                    "n": 1,
                    "p50_ms": round(deployed.get("import_ms") or 0.0, 3),
                }
            )
            plain = import_ms(function, max(3, int(n_imp * scale)), preimport=False)
            rows.append(latency_row(name, "import in fresh python, nothing pre-imported", plain))
    rows.append(latency_row("-", "python -c pass (interpreter start)", interpreter_start_ms(10)))
    return report("specialize_start", rows, dropped_not_specialize=dropped)


if __name__ == "__main__":
    run()
