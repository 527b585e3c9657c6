"""Memory cgroups per instance: v2 where it has the memory controller, else v1.

Each instance gets its own leaf with `memory` MB as its hard limit; the kernel's OOM killer
ends an instance that goes over it, and the pool reads the leaf's OOM count to say so.
"""

from __future__ import annotations

import os
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


class Cgroups:
    """Creates and removes per-instance memory cgroups under one parent for this server."""

    def __init__(self, parent: Path, version: int) -> None:
        self.parent = parent
        self.version = version

    @classmethod
    def detect(cls, name: str) -> Cgroups | None:
        """A manager for this host, or None when memory cgroups cannot be written here."""
        for version, base in _candidates():
            parent = base / "ember" / name
            try:
                _remove_stale(parent.parent)
                parent.mkdir(parents=True, exist_ok=True)
                if version == 2:
                    _enable_memory_v2(parent)
                probe = cls(parent, version)
                probe.remove(probe.create("probe", 64))
                return probe
            except OSError:
                continue
        return None

    def create(self, leaf: str, memory_mb: int) -> str:
        path = self.parent / leaf
        path.mkdir()
        limit = str(memory_mb * 1024 * 1024)
        if self.version == 2:
            (path / "memory.max").write_text(limit)
            (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(limit)
        return str(path / "cgroup.procs")

    def move(self, procs: str, pid: int) -> None:
        with open(procs, "w") as f:
            f.write(str(pid))

    def oom_killed(self, procs: str) -> bool:
        leaf = Path(procs).parent
        try:
            if self.version == 2:
                text = (leaf / "memory.events").read_text()
            else:
                text = (leaf / "memory.oom_control").read_text()
        except OSError:
            return False
        fields = dict(line.split() for line in text.splitlines() if line.count(" ") == 1)
        return int(fields.get("oom_kill", "0")) > 0

    def peak_kb(self, procs: str) -> int:
        leaf = Path(procs).parent
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((leaf / name).read_text()) // 1024
        except (OSError, ValueError):
            return 0

    def remove(self, procs: str) -> None:
        try:
            os.rmdir(Path(procs).parent)
        except OSError:
            pass

    def cleanup(self) -> bool:
        """Remove every leaf and the parent; False while some are still in use."""
        if self.parent.exists():
            for leaf in self.parent.iterdir():
                if leaf.is_dir():
                    self.remove(str(leaf / "cgroup.procs"))
        try:
            self.parent.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


def _remove_stale(root: Path) -> None:
    """Leftovers of servers that were killed: `server-PID` directories of dead processes."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        pid = entry.name.removeprefix("server-")
        if entry.name.startswith("server-") and pid.isdigit() and not _alive(int(pid)):
            Cgroups(entry, 1).cleanup()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _candidates() -> list[tuple[int, Path]]:
    out: list[tuple[int, Path]] = []
    controllers = V2_ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        out.append((2, V2_ROOT))
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        out.append((1, V1_ROOT))
    return out


def _enable_memory_v2(parent: Path) -> None:
    node = V2_ROOT
    for part in parent.relative_to(V2_ROOT).parts:
        (node / "cgroup.subtree_control").write_text("+memory")
        node = node / part
    (parent / "cgroup.subtree_control").write_text("+memory")
