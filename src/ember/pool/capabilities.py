"""Which protections this host gives functions: the facts behind `ember doctor`, the startup
log and `ember up --require-isolation`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec

from ember.pool.cgroup import Cgroups
from ember.runtime import seccomp


class Check(msgspec.Struct, frozen=True):
    name: str
    ok: bool
    detail: str


def _linux() -> bool:
    return sys.platform.startswith("linux")


class SandboxProbe(msgspec.Struct, frozen=True):
    mode: str  # root | userns | none | off
    detail: str = ""


def probe_sandbox(workdir: Path, setting: str, env: dict[str, str] | None = None) -> SandboxProbe:
    """Which sandbox this host allows, found by entering one in a throw-away process
    (`python -m ember.runtime.sandbox`; the server itself never forks)."""
    if setting == "off":
        return SandboxProbe("off", "turned off (--sandbox off)")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ember.runtime.sandbox", str(workdir), setting],
            capture_output=True,
            timeout=30,
            env=env,
        )
        return msgspec.json.decode(done.stdout.splitlines()[-1], type=SandboxProbe)
    except (OSError, subprocess.TimeoutExpired, IndexError, msgspec.DecodeError) as exc:
        return SandboxProbe("none", f"the sandbox probe failed: {exc}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _sandbox_checks(probe: SandboxProbe) -> list[Check]:
    ok = probe.mode in ("root", "userns")
    off = f"off: {probe.detail}; functions run as the server's uid and see its files"
    userns = " (in a user namespace)" if probe.mode == "userns" else ""
    uid_ok = probe.mode == "root" or (probe.mode == "userns" and os.geteuid() == 0)
    if uid_ok:
        uid = "each namespace (tenant) runs as its own uid/gid" + userns
    elif ok:
        uid = (
            "functions run as uid N inside their user namespace but as the server's uid outside: "
            "tenants are kept apart by namespaces only; run as root for a uid per tenant"
        )
    else:
        uid = off
    return [
        Check(
            "mount namespace",
            ok,
            "read-only system, code read-only at /code, private /tmp, no EMBER_HOME" + userns
            if ok
            else off,
        ),
        Check(
            "pid/ipc/uts namespaces", ok, "a function sees only its own processes" if ok else off
        ),
        Check("unprivileged uid", uid_ok, uid),
        Check(
            "seccomp + no_new_privs",
            ok,
            f"{len(seccomp.DENIED)} system calls fail with EPERM (mount, ptrace, bpf, …)"
            if ok
            else off,
        ),
        Check(
            "network: none",
            ok,
            "functions may have a network namespace of their own (loopback only)"
            if ok
            else "needs the sandbox: functions with network: none are refused at deploy",
        ),
    ]


def _cgroup_checks(cgroups: Cgroups | None, enabled: bool) -> list[Check]:
    if cgroups is None:
        why = "turned off" if not enabled else "cgroups not writable here"
        return [
            Check(
                "memory limit",
                True,
                f"{why}: RLIMIT_AS per instance (address space, so allocations fail with "
                "MemoryError instead of an OOM kill)",
            ),
            Check("pids limit", False, f"{why}: a fork bomb is bounded only by the host"),
            Check("cpu share", False, f"{why}: functions compete for CPU as plain processes"),
        ]
    have = cgroups.controllers
    v = f"cgroup v{cgroups.version}"
    return [
        Check("memory limit", True, f"{v}: a hard limit per instance (OOM kill, named in 502)"),
        Check(
            "pids limit",
            "pids" in have,
            f"{v}: pids.max per revision" if "pids" in have else "no pids controller",
        ),
        Check(
            "cpu share",
            "cpu" in have,
            f"{v}: an equal share per revision, optional cpu: cap"
            if "cpu" in have
            else "no cpu controller",
        ),
    ]


def _userns() -> str:
    path = Path("/proc/sys/user/max_user_namespaces")
    return path.read_text().strip() if path.exists() else "0"


def protections(
    cgroups: Cgroups | None, probe: SandboxProbe, use_cgroups: bool = True
) -> list[Check]:
    """What functions started by a server with these settings get."""
    return [
        *_sandbox_checks(probe),
        *_cgroup_checks(cgroups, use_cgroups),
        Check("timeouts", True, "an instance past its timeout is killed with SIGKILL"),
    ]


def missing(checks: list[Check]) -> list[str]:
    return [c.name for c in checks if not c.ok]


def detect(setting: str = "auto") -> list[Check]:
    linux = _linux()
    probe = Cgroups.detect(f"doctor-{os.getpid()}") if linux else None
    sandbox = probe_sandbox(Path(tempfile.mkdtemp(prefix="ember-doctor-")), setting)
    try:
        checks = [
            Check("platform", linux, f"{sys.platform}, Python {sys.version.split()[0]}"),
            Check("fork", hasattr(os, "fork"), "zygotes fork instances (≈1-3 ms)"),
            Check(
                "die with parent",
                linux,
                "PR_SET_PDEATHSIG: zygotes and instances die with the server"
                if linux
                else "not available: orphans are possible after a server crash",
            ),
            Check(
                "privileges",
                True,
                f"uid {os.geteuid()}"
                + (" (root)" if os.geteuid() == 0 else "")
                + f"; max_user_namespaces={_userns()}",
            ),
            *protections(probe, sandbox),
        ]
    finally:
        if probe is not None:
            probe.cleanup()
    try:
        import uvloop  # noqa: F401

        checks.append(Check("uvloop", True, "fast event loop in the server and instances"))
    except ImportError:
        checks.append(Check("uvloop", False, "not installed: asyncio's default loop is used"))
    return checks
