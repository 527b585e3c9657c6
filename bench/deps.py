"""Deploys of a function with requirements (issue 10): `requests` + `pillow`, with uv's cache
cold and warm, next to what a user would run instead, in the same run: `pip install --target`
and `uv pip install --target` of the same two packages, each with an empty cache and a warm one.
Then the disk ten functions with the same requirements take.

* cold: a fresh server with an empty package cache of its own; `ember deploy DIR` until the
  function's first successful answer. The deploy resolves, downloads, installs and
  byte-compiles, and the zygote imports `requests` and `PIL`.
* warm: another function with the same requirements on that server: the lock is reused and
  the layer is there, so nothing is resolved or installed.
* "API" rows time the deploy request alone plus the first call; "CLI" rows time the whole
  `ember deploy` process (its interpreter start, ~0.3 s here, included) plus the first call.

Packages come from the registry (PyPI), as on a user's machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, Row, log, report, summary, verdict, wait_for
from bench.servers import Ember

PACKAGES = ("requests", "pillow")
HANDLER = (
    "import io\nimport requests\nfrom PIL import Image\n\n"
    "def handle(req, ctx):\n"
    "    return {'requests': requests.__version__, 'pillow': Image.__version__}\n"
)
WARM_TARGET_S = 0.5  # issue 10: a warm-cache deploy, `ember deploy` to serving
COLD_FACTOR = 2.0  # issue 10: a cold deploy within 2x uv's own cold install


def _uv() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


def _uv_install() -> list[str]:
    return [_uv(), "pip", "install", "-q", "--python", PYTHON, "--compile-bytecode"]


def _timed(cmd: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=cwd)
    return (time.perf_counter() - t0) * 1000.0


PIP = [PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check"]


def baselines(work: Path, repeat: int) -> dict[str, list[float]]:
    """pip and uv installing the same packages into a fresh --target, cold and warm cache."""
    out: dict[str, list[float]] = {k: [] for k in ("pip cold", "pip warm", "uv cold", "uv warm")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    for i in range(repeat):
        pip_cache, uv_cache = work / f"pip-cache-{i}", work / f"uv-cache-{i}"
        for kind in ("cold", "warm"):  # warm: the same cache a second time
            target = work / f"pip-{i}-{kind}"
            out[f"pip {kind}"].append(
                _timed(
                    [*PIP, "--target", str(target), "--cache-dir", str(pip_cache), *PACKAGES], env
                )
            )
            target = work / f"uv-{i}-{kind}"
            out[f"uv {kind}"].append(
                _timed(
                    [*_uv_install(), "--target", str(target), *PACKAGES],
                    {**env, "UV_CACHE_DIR": str(uv_cache)},
                )
            )
    return out


def _function(root: Path, name: str) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "handler.py").write_text(HANDLER)
    (directory / "requirements.txt").write_text("\n".join(PACKAGES) + "\n")
    return directory


def _changed(directory: Path, j: int) -> Path:
    """The function's code with a change that makes a new revision; same requirements."""
    handler = directory / "handler.py"
    handler.write_text(HANDLER + f"\nCHANGE = {j}\n")
    return directory


def _serving(server: Ember, name: str) -> None:
    def ok() -> bool:
        return server.http.get(f"/fn/{name}").status_code == 200

    wait_for(ok, 60, f"{name} to answer")


def deploy_via_api(server: Ember, directory: Path, name: str) -> tuple[float, dict[str, Any]]:
    from ember.bundle import pack

    t0 = time.perf_counter()
    deployed = server.post_bundle(name, pack(directory))
    _serving(server, name)
    return (time.perf_counter() - t0) * 1000.0, deployed


def deploy_via_cli(server: Ember, directory: Path, name: str) -> float:
    env = {
        **os.environ,
        "EMBER_URL": f"http://127.0.0.1:{server.port}",
        "EMBER_HOME": str(server.home),
    }
    t0 = time.perf_counter()
    subprocess.run(
        [PYTHON, "-m", "ember.cli.main", "deploy", str(directory), "--name", name],
        check=True,
        capture_output=True,
        env=env,
    )
    _serving(server, name)
    return (time.perf_counter() - t0) * 1000.0


def _du(*paths: Path) -> int:
    """Bytes on disk under `paths`; a file hard-linked several times counts once, as on disk."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in paths:
        for dirpath, _, files in os.walk(path):
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def _disk(server: Ember, first: dict[str, Any], functions: int, cache: Path) -> Row:
    root = server.home / "layers"
    layers = [p for p in root.iterdir() if len(p.name) == 64]
    return {
        "functions": functions,
        "layers": len(layers),
        "layers_mb": round(_du(*layers) / 2**20, 1),
        "uv_cache_mb": round(_du(cache) / 2**20, 1),
        "layers_and_cache_mb": round(_du(root, cache) / 2**20, 1),
        "packages": ", ".join(first["layer"]["packages"]),
    }


def run(scale: float = 1.0) -> dict[str, Any]:
    """`scale` below 1 (bench.run_all --quick): one server and fewer deploys."""
    quick = scale < 1.0
    repeat = 1 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="ember-bench-deps-"))
    try:
        log("deps: pip and uv baselines")
        base = baselines(work, repeat)
        cold_api: list[float] = []
        cold_cli: list[float] = []
        warm_api: list[float] = []
        warm_cli: list[float] = []
        again_api: list[float] = []
        again_cli: list[float] = []
        disk: dict[str, float] = {}
        for i in range(repeat):
            log(f"deps: fresh server {i + 1}/{repeat}")
            # a new home and a package cache of its own: nothing is downloaded yet
            with Ember(["--package-cache", str(work / f"cache-{i}")]) as server:
                src = work / f"src-{i}"
                if i % 2 == 0:
                    ms, first = deploy_via_api(server, _function(src, "cold"), "cold")
                    cold_api.append(ms)
                else:
                    cold_cli.append(deploy_via_cli(server, _function(src, "cold"), "cold"))
                for j in range(3 if quick else 5):
                    warm_api.append(deploy_via_api(server, _function(src, f"w{j}"), f"w{j}")[0])
                    warm_cli.append(deploy_via_cli(server, _function(src, f"c{j}"), f"c{j}"))
                # the developer's loop: the code of a deployed function changed, not its
                # requirements (its layer zygote is warm)
                for j in range(3 if quick else 5):
                    directory = _changed(src / "w0", j)
                    again_api.append(deploy_via_api(server, directory, "w0")[0])
                    directory = _changed(src / "c0", j)
                    again_cli.append(deploy_via_cli(server, directory, "c0"))
                if i == 0:  # ten functions or more with the same requirements
                    for j in range(1 + 2 * len(warm_api), 10):
                        deploy_via_api(server, _function(src, f"d{j}"), f"d{j}")
                    functions = max(10, 1 + 2 * len(warm_api))
                    disk = _disk(server, first, functions, work / f"cache-{i}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    uv_cold = summary(base["uv cold"])["p50"]
    rows: list[Row] = []

    def row(what: str, values: list[float], target: str = "", ok: str = "") -> None:
        if not values:
            return
        s = summary(values)
        rows.append(
            {"measurement": what, "n": s["n"], "p50_ms": s["p50"], "max_ms": s["max"]}
            | {"target": target, "verdict": ok}
        )

    cold_all = cold_api + cold_cli
    cold_limit = COLD_FACTOR * uv_cold
    row(
        "Ember cold: deploy (API) + first call",
        cold_api,
        f"<= {COLD_FACTOR:g}x uv cold",
        verdict(summary(cold_api)["p50"], cold_limit, unit=" ms") if cold_api else "",
    )
    row("Ember cold: `ember deploy` (CLI) + first call", cold_cli)
    row("Ember warm (same lock), a new function: deploy (API) + first call", warm_api)
    warm_target = f"<= {WARM_TARGET_S * 1000:g} ms"
    row(
        "Ember warm (same lock), a new function: `ember deploy` (CLI) + first call",
        warm_cli,
        warm_target,
        verdict(summary(warm_cli)["p50"], WARM_TARGET_S * 1000, unit=" ms"),
    )
    row("Ember warm, a new revision (code changed): deploy (API) + first call", again_api)
    row(
        "Ember warm, a new revision (code changed): `ember deploy` (CLI) + first call",
        again_cli,
        warm_target,
        verdict(summary(again_cli)["p50"], WARM_TARGET_S * 1000, unit=" ms"),
    )
    for key in ("pip cold", "pip warm", "uv cold", "uv warm"):
        row(f"baseline: {key.split()[0]} install --target, {key.split()[1]} cache", base[key])
    doc = report(
        "deps",
        rows,
        sections={"disk: functions with the same requirements": [disk]} if disk else None,
        packages=list(PACKAGES),
        cold_all_ms=[round(v, 1) for v in cold_all],
    )
    return doc


if __name__ == "__main__":
    run(0.25 if "--quick" in sys.argv else 1.0)
