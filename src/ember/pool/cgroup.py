"""Cgroups per revision and per instance: v2 where it has the controllers, else v1.

Layout, below one parent per server (`ember/server-PID`):

    <revision>/            pids.max and the CPU share/quota of all its processes
    <revision>/zygote-ID   memory of the function zygote: `memory` + 4 MB per instance of
                           `scale.max` (at most 256 MB more), because a new instance is charged
                           here for its first milliseconds, until the server moves it out
    <revision>/<instance>  memory limit of one instance

In v1 each controller has its own tree: the zygote joins `pids/…/<revision>`,
`cpu/…/<revision>` and `memory/…/<revision>/zygote-ID` (its keeper writes its pid there before
the import); the instances inherit pids and CPU by forking and the server moves each into its
memory leaf. In v2 the one tree has the same shape. The kernel's OOM killer ends an instance
over its limit, and the pool reads the leaf's OOM count to say so.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup")
V2_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000


class Cgroups:
    """Creates and removes this server's cgroups. `trees` maps a controller to its parent
    directory (v1), or has the one entry "" (v2)."""

    def __init__(self, trees: dict[str, Path], version: int) -> None:
        self.trees = trees
        self.version = version

    @property
    def controllers(self) -> list[str]:
        if self.version == 2:
            return ["memory", "pids", "cpu"]
        return sorted(self.trees)

    @classmethod
    def detect(cls, name: str) -> Cgroups | None:
        """A manager for this host, or None when memory cgroups cannot be written here."""
        for version, trees in _candidates(name):
            try:
                for parent in trees.values():
                    _remove_stale(parent.parent, version)
                    parent.mkdir(parents=True, exist_ok=True)
                    if version == 2:
                        _enable_v2(parent)
                probe = cls(trees, version)
                probe.revision("probe", 64, 16, 0.0)
                probe.remove(probe.create("probe", "leaf", 64))
                probe.remove_revision("probe")
                return probe
            except OSError:
                continue
        return None

    def _dir(self, controller: str) -> Path:
        return self.trees[""] if self.version == 2 else self.trees[controller]

    def revision(self, rev: str, zygote_mb: int, pids: int, cpu: float) -> list[str]:
        """Create a revision's cgroups; the `cgroup.procs` files its zygote joins (the memory
        leaf of the zygote last)."""
        joins: list[str] = []
        for controller, parent in sorted(self.trees.items()):
            path = parent / rev
            path.mkdir(exist_ok=True)
            if self.version == 2:
                (path / "cgroup.subtree_control").write_text("+memory")
            elif controller in ("pids", "cpu"):
                joins.append(str(path / "cgroup.procs"))
        self.set_limits(rev, pids, cpu)
        # One leaf per start: a zygote that failed may still be leaving the previous one.
        joins.append(self.create(rev, f"zygote-{secrets.token_hex(3)}", zygote_mb))
        return joins

    def set_limits(self, rev: str, pids: int, cpu: float) -> None:
        if self.version == 2:
            path = self.trees[""] / rev
            (path / "pids.max").write_text(str(pids))
            quota = str(int(cpu * CPU_PERIOD_US)) if cpu > 0 else "max"
            (path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            return
        if "pids" in self.trees:
            (self.trees["pids"] / rev / "pids.max").write_text(str(pids))
        if "cpu" in self.trees:
            path = self.trees["cpu"] / rev
            (path / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            quota = str(int(cpu * CPU_PERIOD_US)) if cpu > 0 else "-1"
            (path / "cpu.cfs_quota_us").write_text(quota)

    def assign(self, spare: str, zygote_leaf: str, zygote_mb: int, pids: int, cpu: float) -> None:
        """Give a spare's cgroups (its zygote already inside) a revision's limits: a few
        writes, no migration. (They keep the spare's name: cgroup v2 cannot rename.)"""
        self.set_limits(spare, pids, cpu)
        self._limit_memory(Path(zygote_leaf).parent, zygote_mb)

    def parent_for_instances(self, rev: str) -> None:
        """The memory directory instance leaves go below when the zygote is not placed."""
        path = self._dir("memory") / rev
        path.mkdir(exist_ok=True)
        if self.version == 2:
            (path / "cgroup.subtree_control").write_text("+memory")

    def create(self, rev: str, leaf: str, memory_mb: int) -> str:
        """A memory leaf below the revision; its `cgroup.procs`."""
        path = self._dir("memory") / rev / leaf
        path.mkdir(parents=True)
        self._limit_memory(path, memory_mb)
        return str(path / "cgroup.procs")

    def _limit_memory(self, path: Path, memory_mb: int) -> None:
        limit = str(memory_mb * 1024 * 1024)
        if self.version == 2:
            (path / "memory.max").write_text(limit)
            (path / "memory.swap.max").write_text("0")
            return
        files = [path / "memory.limit_in_bytes"]
        swap = path / "memory.memsw.limit_in_bytes"  # with swap accounting: no swapping
        if swap.exists():  # memory + swap may never be below memory: order the writes
            growing = int(limit) > int(files[0].read_text())
            files = [swap, files[0]] if growing else [files[0], swap]
        for file in files:
            file.write_text(limit)

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

    def remove(self, procs: str) -> bool:
        """rmdir a leaf; False while a process is still in it."""
        try:
            os.rmdir(Path(procs).parent)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def remove_revision(self, rev: str) -> bool:
        """Remove a revision's cgroups; False while some process is still in one."""
        done = True
        for parent in self.trees.values():
            done = _rmtree(parent / rev) and done
        return done

    def cleanup(self) -> bool:
        """Remove everything of this server; False while some cgroup is still in use."""
        return all([_rmtree(parent) for parent in self.trees.values()])


def _rmtree(path: Path) -> bool:
    """rmdir, leaves first (cgroup directories hold only kernel files, removed with them)."""
    if not path.is_dir():
        return True
    ok = all([_rmtree(child) for child in path.iterdir() if child.is_dir()])
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return ok


def _remove_stale(root: Path, version: int) -> None:
    """Leftovers of servers that were killed: `server-PID` directories of dead processes."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        pid = entry.name.rpartition("-")[2]
        if entry.name.startswith(("server-", "doctor-")) and pid.isdigit() and not _alive(int(pid)):
            _rmtree(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _candidates(name: str) -> list[tuple[int, dict[str, Path]]]:
    out: list[tuple[int, dict[str, Path]]] = []
    controllers = V2_ROOT / "cgroup.controllers"
    if controllers.exists() and {"memory", "pids", "cpu"} <= set(controllers.read_text().split()):
        out.append((2, {"": V2_ROOT / "ember" / name}))
    if (V1_ROOT / "memory" / "memory.limit_in_bytes").exists():
        trees = {"memory": V1_ROOT / "memory" / "ember" / name}
        for controller in ("pids", "cpu"):
            if (V1_ROOT / controller / "cgroup.procs").exists():
                trees[controller] = V1_ROOT / controller / "ember" / name
        out.append((1, trees))
    return out


def _enable_v2(parent: Path) -> None:
    node = V2_ROOT
    for part in parent.relative_to(V2_ROOT).parts:
        (node / "cgroup.subtree_control").write_text("+memory +pids +cpu")
        node = node / part
    (parent / "cgroup.subtree_control").write_text("+memory +pids +cpu")
