"""The function sandbox, entered by a function zygote before it imports user code.

Small wrappers over the kernel's interfaces (unshare, mount, pivot_root, setresuid, seccomp);
no helper binary, because the zygote must stay a fork of the root zygote to keep the
runtime it already imported. The steps, in order:

1. `split()`: unshare a pid namespace (and, without privileges, a user namespace first) and
   fork. The child is pid 1 of the new pid namespace and becomes the zygote; the parent, the
   *keeper*, moves it into the revision's cgroups, reports and exits. The root zygote is a
   child subreaper, so the zygote becomes its child and re-arms its death signal on it
   (`placed`): one process per zygote, dying with the root zygote and so with the server. A
   spare zygote does this step ahead of need.
2. `finish()`: unshare mount, ipc and uts namespaces (and network for `network: none`) in the
   zygote alone, and `build_root()`: a tmpfs root with read-only bind mounts of the system
   (`/usr`, `/etc`, the interpreter, site-packages and Ember), the revision's code read-only at
   `/code`, a size-capped private `/tmp`, a minimal `/dev`, a `/proc` of the new pid namespace
   and the function's secrets at `/run/secrets`; then `pivot_root` into it and forget the
   host's tree.
3. `lock_down()`: wait until the keeper placed us in the cgroups and exited, drop to the namespace's
   unprivileged uid/gid (or drop every capability inside a user namespace), set
   no_new_privs, and install the seccomp filter.

Everything the zygote forks afterwards (its instances) inherits all of it.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import sys

from ember.runtime import host_paths, limits, lineage, seccomp
from ember.wire.messages import SandboxPlan

CODE_DIR = "/code"  # where the revision's code appears inside the sandbox
LAYER_DIR = "/layer"  # where its installed requirements appear (ember.layers), read-only
SECRETS_DIR = "/run/secrets"

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNS = 0x00020000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000

_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_NOATIME = 0x400
_MS_NODIRATIME = 0x800
_MS_RELATIME = 0x200000
# statvfs flags of a mount → the mount(2) flags a remount must keep: in a user namespace the
# kernel refuses to clear flags the mount had when it was inherited.
_KEPT = (
    (os.ST_NOEXEC, _MS_NOEXEC),
    (os.ST_NOATIME, _MS_NOATIME),
    (os.ST_NODIRATIME, _MS_NODIRATIME),
    (os.ST_RELATIME, _MS_RELATIME),
)
_MS_PRIVATE = 0x40000
_MNT_DETACH = 0x2
_PR_SET_DUMPABLE = 4
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

_SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc")
_SYSTEM_OPTIONAL = ("/sys/devices/system/cpu",)  # CPU counts for BLAS and os.cpu_count()
_DEVICES = ("null", "zero", "full", "random", "urandom")


class SandboxError(OSError):
    """The host refused a step of the sandbox; the message names the step."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"sandbox: {what} failed: {os.strerror(err)}")


def _libc() -> ctypes.CDLL:
    libc = limits.load_libc()
    if libc is None:
        raise SandboxError(0, "sandbox: needs Linux")
    return libc


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    libc = _libc()
    result = libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(result, f"mount {source or fstype or ''} on {target}")


def _bind(source: str, target: str, *, read_only: bool = True, flags: int = 0) -> None:
    """Bind `source` at `target`, then remount it read-only (a bind ignores MS_RDONLY at first)."""
    _mount(source, target, None, _MS_BIND)
    extra = _MS_RDONLY if read_only else 0
    kept = os.statvfs(source).f_flag
    for st_flag, ms_flag in _KEPT:
        if kept & st_flag:
            extra |= ms_flag
    _mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_NOSUID | _MS_NODEV | extra | flags)


# ---- 1: namespaces and the hand-off ----


def split(cgroups: list[str], userns: SandboxPlan | None = None) -> int:
    """Unshare a pid namespace (and, with `userns`, a user namespace) and fork; returns in the
    child (the zygote to be) the read end of the pipe on which the keeper reports the cgroup
    placement. The keeper never returns. A spare zygote stops after this step until it is
    given its function; the placement, which can wait out an RCU grace period, is done by then.

    When the caller's parent is a child subreaper (the root zygote), the keeper exits once it
    has reported and the zygote becomes the root's child (`placed`): no process per zygote
    stays outside the sandbox. Otherwise the keeper waits for the zygote, as it always did.
    """
    if userns is not None:  # no privileges: a user namespace of our own gives them, inside only
        if os.geteuid() == 0:  # the tenant would be uid 0 outside its namespaces
            raise SandboxError(0, "sandbox: a user namespace would map the tenant to uid 0")
        uid, gid = os.geteuid(), os.getegid()
        _check(
            _libc().unshare(_CLONE_NEWUSER | _CLONE_NEWPID), "unshare of user and pid namespaces"
        )
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{userns.uid} {uid} 1")
        _write("/proc/self/gid_map", f"{userns.gid} {gid} 1")
    else:
        _check(_libc().unshare(_CLONE_NEWPID), "unshare of a pid namespace")
    ready_r, ready_w = os.pipe()
    keeper, reaper = os.getpid(), os.getppid()
    handoff = limits.parent_is_subreaper()
    blocked = {lineage.HANDOFF} if handoff else set()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)  # the child starts so
    child = os.fork()
    if child == 0:
        os.close(ready_w)
        if handoff:
            lineage.watch(keeper, reaper)
        else:
            limits.die_with_parent(keeper, in_new_pid_namespace=True)
        return ready_r
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(ready_r)
    limits.close_fds_except(ready_w)  # the zygote's channel is the zygote's alone
    _keep(child, cgroups, ready_w)
    if not handoff:
        _wait(child)
    os._exit(0)


def _unshare_rest(network_none: bool) -> None:
    """In the zygote alone: the keeper keeps the host's mounts (pivot_root moves every process
    of a mount namespace)."""
    flags = _CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWUTS
    if network_none:
        flags |= _CLONE_NEWNET
    _check(_libc().unshare(flags), "unshare of mount, ipc and uts namespaces")
    if network_none:
        limits.loopback_up()


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise SandboxError(
            exc.errno or 0, f"sandbox: writing {path} failed: {exc.strerror}"
        ) from None


def _keep(child: int, cgroups: list[str], ready_w: int) -> None:
    """The keeper: place the zygote in its cgroups and report."""
    report = b"ok"
    for procs in cgroups:
        try:
            with open(procs, "w") as f:
                f.write(str(child))
        except OSError as exc:
            report = f"could not join {os.path.dirname(procs)}: {exc.strerror}".encode()
            break
    try:
        os.write(ready_w, report)
    finally:
        os.close(ready_w)


def _wait(child: int) -> None:
    """A keeper whose parent cannot adopt the zygote: wait for it, then exit as it did."""
    while True:
        try:
            _, status = os.waitpid(child, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(0)
        os._exit(min(255, abs(os.waitstatus_to_exitcode(status))))


# ---- 2: the root file system ----


def _mkdirs(root: str, path: str) -> str:
    target = root + path
    os.makedirs(target, mode=0o755, exist_ok=True)
    return target


def warm() -> None:
    """In the root zygote: what every sandbox needs and can be known before any function."""
    host_paths.python_paths()
    host_paths.site_packages()


def _runtime_only(root: str, bound: list[str]) -> None:
    """Over each visible site-packages directory, an empty read-only tmpfs with only the
    runtime's own entries bound into it: what the server's environment has installed
    (starlette, httpx, numpy, …) is not importable, so no function depends on it by accident."""
    for site, entries in host_paths.site_packages():
        if not host_paths.under(site, bound):
            continue
        target = root + site
        _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
        for name in entries:
            source = os.path.join(site, name)
            if os.path.isdir(source):
                os.mkdir(f"{target}/{name}")
            else:
                open(f"{target}/{name}", "w").close()
            _bind(source, f"{target}/{name}")
        _mount(None, target, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _system(root: str) -> list[str]:
    bound: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isdir(path):
            _bind(path, _mkdirs(root, path))
            bound.append(path)
    for path in [*host_paths.python_paths(), *(p for p in _SYSTEM_OPTIONAL if os.path.isdir(p))]:
        if not host_paths.under(path, bound):
            _bind(path, _mkdirs(root, path))
            bound.append(path)
    _runtime_only(root, bound)
    return bound


def _dev(root: str) -> None:
    dev = _mkdirs(root, "/dev")
    _mount("tmpfs", dev, "tmpfs", _MS_NOSUID | _MS_NOEXEC, "size=64k,mode=0755")
    for name in _DEVICES:
        target = f"{dev}/{name}"
        open(target, "w").close()
        _mount(f"/dev/{name}", target, None, _MS_BIND)
        _mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_NOSUID | _MS_NOEXEC)
    for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0")):
        os.symlink(to, f"{dev}/{name}")
    os.symlink("/proc/self/fd/1", f"{dev}/stdout")
    os.symlink("/proc/self/fd/2", f"{dev}/stderr")
    shm = _mkdirs(root, "/dev/shm")
    _mount("tmpfs", shm, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=16m,mode=1777")
    _mount(None, dev, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NOEXEC)


def _secrets(root: str, plan: SandboxPlan) -> None:
    target = _mkdirs(root, SECRETS_DIR)
    mode = f"size=1m,mode=0500,uid={plan.uid},gid={plan.gid}"
    _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, mode)
    for name, value in plan.secrets.items():
        path = f"{target}/{name}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)
        os.chown(path, plan.uid, plan.gid)
    _mount(None, target, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def build_root(plan: SandboxPlan, code_dir: str, layer_dir: str = "") -> None:
    """Assemble the sandbox's file system under `plan.root` and pivot into it."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount reaches the host
    root = plan.root
    _mount("ember", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    # The private /tmp first: an interpreter or Ember installed under /tmp is then bound on
    # top of it (into root-owned directories the function cannot rename), not hidden by it.
    tmp = _mkdirs(root, "/tmp")
    _mount("tmpfs", tmp, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={plan.tmp_mb}m,mode=1777")
    bound = _system(root)
    for hidden in map(os.path.realpath, plan.hide):  # EMBER_HOME under a bound directory
        if host_paths.under(hidden, bound) and os.path.isdir(hidden):
            _mount("tmpfs", root + hidden, "tmpfs", _MS_RDONLY, "size=4k,mode=0000")
    if code_dir:
        _bind(code_dir, _mkdirs(root, CODE_DIR))
    else:  # a layer zygote's: each revision's code is mounted below it later (code_mount.py)
        _mount(
            "tmpfs", _mkdirs(root, CODE_DIR), "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755"
        )
    for path in plan.binds:  # after /tmp: a directory under it is shown, not hidden
        if os.path.isdir(path):
            _bind(path, _mkdirs(root, path))
    if layer_dir:
        _bind(layer_dir, _mkdirs(root, LAYER_DIR))
    _dev(root)
    _secrets(root, plan)
    proc = _mkdirs(root, "/proc")
    _mount("proc", proc, "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    for path in ("sys", "sysrq-trigger"):  # kernel knobs: read-only even to a uid 0
        if os.path.exists(f"{proc}/{path}"):
            _bind(f"{proc}/{path}", f"{proc}/{path}")
    old = _mkdirs(root, "/.old")
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise SandboxError(0, f"sandbox: pivot_root is not known on {os.uname().machine}")
    _check(_libc().syscall(number, root.encode(), old.encode()), "pivot_root")
    os.chdir("/")
    _check(_libc().umount2(b"/.old", _MNT_DETACH), "unmount of the host's tree")
    os.rmdir("/.old")
    _mount(None, "/", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    socket.sethostname(plan.hostname)


# ---- 3: privileges ----


def placed(ready_r: int) -> None:
    """Wait for the keeper's report that the zygote is in its cgroups, then for the keeper's
    exit: the zygote is the root zygote's child from then on, and dies with it."""
    report = os.read(ready_r, 512)
    os.close(ready_r)
    if report != b"ok":
        raise SandboxError(0, f"sandbox: {report.decode(errors='replace') or 'keeper died'}")
    if lineage.current is not None and (error := lineage.current.adopted()):
        raise SandboxError(0, f"sandbox: {error}")


def lock_down(plan: SandboxPlan, ready_r: int) -> None:
    """Wait for the cgroup placement (unless a spare did already: -1), then drop every
    privilege for good."""
    if ready_r >= 0:
        placed(ready_r)
    # fds 0-2 were the server's (its terminal or log file): not for a tenant to read or write.
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    # Its own cgroup tree is all it sees of cgroups (the server's paths stay hidden).
    _check(_libc().unshare(_CLONE_NEWCGROUP), "unshare of a cgroup namespace")
    if plan.userns:  # uid and gid are mapped already; the capabilities go
        _drop_capabilities()
    else:
        os.setgroups([])
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
    _die_with_root()  # a change of credentials cleared the death signal
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files of user code
    # Not dumpable: no process of the revision may open another's /proc/PID/mem (instances
    # and their zygote share a uid; in a user namespace they would otherwise be "owners").
    _check(_libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    seccomp.install()  # sets no_new_privs first
    os.environ["HOME"] = "/tmp"
    os.environ["TMPDIR"] = "/tmp"


def _die_with_root() -> None:
    if lineage.current is None:  # a keeper waits outside: die with it
        limits.die_with_parent(0, in_new_pid_namespace=True)
    elif not lineage.release():
        raise SandboxError(0, "sandbox: the root zygote exited while the zygote started")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_capabilities() -> None:
    """capset(2) with empty sets: what the user namespace granted is gone for good."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc().capset(ctypes.byref(header), data), "dropping capabilities")


def finish(
    plan: SandboxPlan, code_dir: str, network_none: bool, ready_r: int, layer_dir: str = ""
) -> None:
    """Steps 2 and 3, in the zygote `split` returned in."""
    _unshare_rest(network_none)
    build_root(plan, code_dir, layer_dir)
    lock_down(plan, ready_r)


def enter(plan: SandboxPlan, code_dir: str, network_none: bool, layer_dir: str = "") -> None:
    """All three steps; returns in the sandboxed zygote (pid 1 of its pid namespace)."""
    ready_r = split(plan.cgroups, plan if plan.userns else None)
    finish(plan, code_dir, network_none, ready_r, layer_dir)


def privileged() -> bool:
    """CAP_SYS_ADMIN in the effective set: root that may mount and create namespaces."""
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caps.split()[1], 16) & (1 << 21))


if __name__ == "__main__":  # what this host allows: `python -m ember.runtime.sandbox DIR [MODE]`
    import json

    from ember.runtime.sandbox_probe import probe

    found, reason = probe(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "auto")
    sys.stdout.write(json.dumps({"mode": found, "detail": reason}) + "\n")
