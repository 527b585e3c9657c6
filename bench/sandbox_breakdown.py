"""Where a sandboxed function zygote's extra specialize time goes (diagnostic; root on Linux).

Mimics what the root zygote and a function zygote do, without a server: this process imports
`ember.runtime.root` (the heap a function zygote is forked from), creates a revision's cgroups
the way the server does before a spawn (`Cgroups.revision`), forks, and the child calls the real
`ember.runtime.sandbox.split`, `build_root` and `lock_down` with a `SandboxPlan` whose root is a
temporary directory. Their steps are timed by wrapping the module's helpers (`_system`, `_bind`,
`_mount`, `_dev`, libc's `unshare`, `syscall` (pivot_root), `umount2`, `seccomp.install`, ...)
in the child only; the keeper (the process left outside the pid namespace) times its writes of
the zygote's pid into the cgroups. Then, inside the finished sandbox, two micro-benchmarks
compare with the same outside it: a cheap syscall (`getppid`) under the seccomp filter, and
fork + exit + wait (what each instance start does).

Samples are SPACING seconds apart (0.1 s by default), like specialize starts, each of which
follows a drain and a kill.
Every mount lives in the child's own mount namespace and goes with it; the cgroups are removed
at the end.

    sudo .venv/bin/python -m bench.sandbox_breakdown [-n N] [--spacing S] [--no-cgroups]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ember.runtime.root  # noqa: F401  (the root zygote's imports: the heap that is forked)
from bench.common import Row, log, report, summary
from ember.pool.cgroup import Cgroups
from ember.runtime import host_paths, limits, sandbox, seccomp
from ember.wire.messages import SandboxPlan

N = 30
SPACING = 0.1
now = time.perf_counter


class Clock:
    """Durations (ms) and counts per step, gathered by wrappers in one process."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.split_at = 0.0  # perf_counter() when split() was called

    def add(self, step: str, ms: float) -> None:
        self.ms[step] = self.ms.get(step, 0.0) + ms
        self.calls[step] = self.calls.get(step, 0) + 1

    def wrap(self, owner: Any, attr: str, step: str) -> None:
        inner: Callable[..., Any] = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = now()
            try:
                return inner(*args, **kwargs)
            finally:
                self.add(step, (now() - t) * 1000.0)

        setattr(owner, attr, timed)


def _unshare_step(flags: int) -> str:
    if flags & sandbox._CLONE_NEWPID:
        return "unshare pid ns"
    if flags & sandbox._CLONE_NEWCGROUP:
        return "unshare cgroup ns"
    return "unshare mount+ipc+uts ns"


def _instrument(clock: Clock, keeper_log: str) -> None:
    """Wrap the sandbox's helpers (in this forked child only)."""
    libc = sandbox._libc()
    unshare = libc.unshare

    def timed_unshare(flags: int) -> int:
        t = now()
        try:
            return int(unshare(flags))
        finally:
            clock.add(_unshare_step(flags), (now() - t) * 1000.0)

    setattr(libc, "unshare", timed_unshare)  # noqa: B010
    clock.wrap(libc, "syscall", "pivot_root")
    clock.wrap(libc, "umount2", "detach the host's tree (umount2)")
    clock.wrap(sandbox, "_system", "bind system + python dirs (_system)")
    clock.wrap(sandbox, "_bind", "bind + read-only remount (every _bind)")
    clock.wrap(sandbox, "_mount", "mount(2) calls (all)")
    clock.wrap(sandbox, "_dev", "/dev: tmpfs + device binds + /dev/shm")
    clock.wrap(sandbox, "_secrets", "/run/secrets tmpfs")
    clock.wrap(socket, "sethostname", "sethostname")
    clock.wrap(seccomp, "install", "seccomp.install (no_new_privs + filter)")
    clock.wrap(limits, "die_with_parent", "prctl PDEATHSIG")
    keep = sandbox._keep

    def timed_keep(child: int, cgroups: list[str], ready_w: int) -> None:
        writes = {}
        for procs in cgroups:  # what _keep does, timed, before it reports and waits
            t = now()
            with open(procs, "w") as f:
                f.write(str(child))
            controller = procs.split("/sys/fs/cgroup/", 1)[-1].split("/", 1)[0]
            writes[f"keeper: join {controller} cgroup"] = (now() - t) * 1000.0
        writes["keeper: joined all (since split began)"] = (now() - clock.split_at) * 1000
        with open(keeper_log, "w") as f:
            json.dump(writes, f)
        keep(child, [], ready_w)

    sandbox._keep = timed_keep


def _micro(fork_rounds: int = 20, calls: int = 20000) -> dict[str, float]:
    """getppid() (µs per call) and fork + _exit + waitpid (ms), in the calling process."""
    t = now()
    for _ in range(calls):
        os.getppid()
    per_call_us = (now() - t) / calls * 1e6
    forks = []
    for _ in range(fork_rounds):
        t = now()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        forks.append((now() - t) * 1000.0)
    return {"getppid_us": per_call_us, "fork_exit_wait_ms": summary(forks)["p50"]}


def _zygote(plan: SandboxPlan, code: str, forked_at: float, out_w: int, keeper_log: str) -> None:
    """The child: enter the sandbox step by step, report the times on out_w."""
    first = now()
    clock = Clock()
    clock.add("fork of the zygote from the root-like parent", (first - forked_at) * 1000.0)
    _instrument(clock, keeper_log)
    t = clock.split_at = now()
    ready_r = sandbox.split(plan.cgroups, plan if plan.userns else None)
    clock.add("split: unshare pid ns + fork keeper/zygote (total)", (now() - t) * 1000.0)
    t = now()
    sandbox._unshare_rest(False)  # what `finish` does before build_root
    clock.add("unshare mount + ipc + uts", (now() - t) * 1000.0)
    t = now()
    sandbox.build_root(plan, code)
    clock.add("build_root (total)", (now() - t) * 1000.0)
    t = now()
    select.select([ready_r], [], [])
    clock.add("wait for the keeper's cgroup report", (now() - t) * 1000.0)
    t = now()
    sandbox.lock_down(plan, ready_r)
    clock.add("lock_down (total)", (now() - t) * 1000.0)
    clock.add("sandbox.enter, all steps (from the fork)", (now() - first) * 1000.0)
    inside = _micro()
    doc = {"ms": clock.ms, "calls": clock.calls, "inside": inside, "uid": os.getuid()}
    os.write(out_w, json.dumps(doc).encode())


def one(plan: SandboxPlan, code: str, tmp: str, i: int) -> dict[str, Any]:
    keeper_log = os.path.join(tmp, f"keeper-{i}.json")
    out_r, out_w = os.pipe()
    forked_at = now()
    pid = os.fork()
    if pid == 0:
        code_ = 1
        try:
            os.close(out_r)
            _zygote(plan, code, forked_at, out_w, keeper_log)
            code_ = 0
        except BaseException as exc:
            os.write(out_w, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(code_)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        got: dict[str, Any] = json.loads(f.read() or b'{"error": "no report"}')
    os.waitpid(pid, 0)  # the keeper: it exits once the zygote has
    if "error" in got:
        raise RuntimeError(got["error"])
    with open(keeper_log) as f:
        got["ms"].update(json.load(f))
    return got


def run(n: int = N, spacing: float = SPACING, use_cgroups: bool = True) -> dict[str, Any]:
    if not sandbox.privileged():
        raise SystemExit("bench.sandbox_breakdown needs root (CAP_SYS_ADMIN)")
    tmp = tempfile.mkdtemp(prefix="ember-sandbox-breakdown-")
    os.chmod(tmp, 0o755)
    root, code = os.path.join(tmp, "root"), os.path.join(tmp, "code")
    os.makedirs(root)
    os.makedirs(os.path.join(code, "src"))
    os.chmod(code, 0o755)
    sandbox._libc()  # loaded (find_library runs ldconfig) before forking, as in the root zygote
    cgroups = Cgroups.detect(f"bench-{os.getpid()}") if use_cgroups else None
    samples: list[dict[str, Any]] = []
    try:
        for i in range(n + 2):
            rev = f"default.probe.{i}.0123456789"
            joins: list[str] = []
            t = now()
            if cgroups is not None:
                joins = cgroups.revision(rev, 128, 64, 0.0)
            made = (now() - t) * 1000.0
            plan = SandboxPlan(
                root=root, uid=900_000, gid=900_000, hostname="probe", tmp_mb=64, cgroups=joins
            )
            time.sleep(spacing)
            got = one(plan, code, tmp, i)
            got["outside"] = _micro()  # the same in this (root-like) process, for comparison
            got["ms"]["server: create revision cgroups (Cgroups.revision)"] = made
            if cgroups is not None:
                cgroups.remove_revision(rev)
            if i >= 2:  # the first two warm caches up
                samples.append(got)
    finally:
        if cgroups is not None and not cgroups.cleanup():
            log("WARNING: some cgroups could not be removed")
        shutil.rmtree(tmp, ignore_errors=True)
    steps: list[str] = []
    for s in samples:
        steps += [k for k in s["ms"] if k not in steps]
    rows: list[Row] = []
    for step in steps:
        values = [s["ms"][step] for s in samples if step in s["ms"]]
        calls = samples[0]["calls"].get(step, 1)
        st = summary(values)
        rows.append({"step": step, "calls": calls, "p50_ms": st["p50"], "p90_ms": st["p90"]})
    inside = {k: summary([s["inside"][k] for s in samples])["p50"] for k in samples[0]["inside"]}
    outside = {k: summary([s["outside"][k] for s in samples])["p50"] for k in inside}
    for key, unit in (("getppid_us", "µs per call"), ("fork_exit_wait_ms", "ms")):
        rows.append(
            {
                "step": f"{key.rsplit('_', 1)[0]} ({unit}): outside → inside the sandbox",
                "p50_ms": f"{outside[key]:.3f} → {inside[key]:.3f}",
            }
        )
    bound = host_paths.python_paths()
    return report(
        "sandbox_breakdown",
        rows,
        samples=len(samples),
        spacing_s=spacing,
        cgroups=None if cgroups is None else f"v{cgroups.version} {cgroups.controllers}",
        python_dirs_bound=bound,
        uid_inside=samples[0]["uid"] if samples else None,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.sandbox_breakdown", description=__doc__)
    parser.add_argument("-n", type=int, default=N, help="samples")
    parser.add_argument("--spacing", type=float, default=SPACING, help="seconds before each")
    parser.add_argument("--no-cgroups", action="store_true", help="a plan without cgroups")
    args = parser.parse_args()
    run(args.n, args.spacing, not args.no_cgroups)
