"""What isolation and limits this host gives instances: the facts behind `ember doctor`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec

from ember.pool.cgroup import Cgroups


class Check(msgspec.Struct, frozen=True):
    name: str
    ok: bool
    detail: str


def _memory() -> Check:
    if not sys.platform.startswith("linux"):
        return Check("memory limit", False, "not Linux: no cgroups; RLIMIT_AS where supported")
    probe = Cgroups.detect(f"doctor-{os.getpid()}")
    if probe is None:
        return Check(
            "memory limit",
            True,
            "cgroups not writable here: RLIMIT_AS per instance (address space, so "
            "allocations fail with MemoryError instead of an OOM kill)",
        )
    probe.cleanup()
    return Check(
        "memory limit",
        True,
        f"cgroup v{probe.version} memory controller: a hard limit per instance",
    )


def _netns() -> Check:
    ok = sys.platform.startswith("linux") and (os.getuid() == 0 or _userns().ok)
    return Check(
        "network: none",
        ok,
        "functions can get a network namespace of their own (loopback only)"
        if ok
        else "needs root or user namespaces: functions with network: none are refused",
    )


def _userns() -> Check:
    path = Path("/proc/sys/user/max_user_namespaces")
    count = int(path.read_text()) if path.exists() else 0
    return Check(
        "user namespaces",
        count > 0,
        f"max_user_namespaces={count}; namespace sandboxing is not implemented yet, "
        "functions share the server's filesystem view and uid",
    )


def detect() -> list[Check]:
    linux = sys.platform.startswith("linux")
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
        Check("privileges", True, f"uid {os.getuid()}" + (" (root)" if os.getuid() == 0 else "")),
        _memory(),
        Check("timeouts", True, "an instance past its timeout is killed with SIGKILL"),
        _userns(),
        _netns(),
    ]
    try:
        import uvloop  # noqa: F401

        checks.append(Check("uvloop", True, "fast event loop in the server and instances"))
    except ImportError:
        checks.append(Check("uvloop", False, "not installed: asyncio's default loop is used"))
    return checks
