"""A seccomp filter for function code: a short deny-list of syscalls no function needs.

Installed by a function zygote right before it imports user code; every process it forks (its
instances, and whatever they fork or exec) inherits it, and it can never be removed. It is a
classic BPF program handed to `prctl(PR_SET_SECCOMP)` through ctypes, built once at import
time so that `install()` on the cold-start path is two prctl calls.

What the filter does, for the architecture this interpreter runs on (x86_64 or aarch64):

- a syscall made through another ABI (i386 `int 0x80` on x86_64, AArch32 after an exec on
  aarch64) ends the whole process (`SECCOMP_RET_KILL_PROCESS`): syscall numbers differ
  between ABIs, so the deny-list below would not hold for it;
- x32 syscalls on x86_64 (numbers with bit 30 set) fail with EPERM;
- every syscall in `DENIED` fails with EPERM: mounting, namespaces, tracing other processes,
  kernel modules, kexec, eBPF, keyrings, swap, the clock, the hostname, ...;
- `clone` fails with EPERM when its flags ask for a new namespace; otherwise it is allowed, so
  `os.fork()`, threads and `subprocess` work;
- `clone3` fails with ENOSYS: its flags live in memory, out of the filter's reach, and glibc
  falls back to `clone` on ENOSYS (Docker's default profile does the same);
- everything else is allowed.

A denied call fails as a missing permission would, so Python code sees a `PermissionError`
instead of a dead process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

from ember.runtime.limits import load_libc

DENIED: tuple[str, ...] = (
    # filesystems and mounts
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "open_by_handle_at",
    "name_to_handle_at",
    "quotactl",
    "swapon",
    "swapoff",
    "acct",
    # namespaces (clone is filtered by its flags, clone3 answers ENOSYS)
    "unshare",
    "setns",
    # other processes' memory
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    # the kernel itself
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "lookup_dcookie",
    "syslog",
    "iopl",
    "ioperm",
    # keyrings
    "keyctl",
    "add_key",
    "request_key",
    # host-wide settings
    "settimeofday",
    "clock_settime",
    "sethostname",
    "setdomainname",
    # large kernel attack surface a function does not need (Docker's profile denies these too)
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "pidfd_getfd",
    "process_madvise",
    "modify_ldt",
)
"""Syscalls that fail with EPERM under the filter (those that exist on the architecture)."""

_NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
"""`clone` flags that make it fail with EPERM (CLONE_NEWTIME is clone3/unshare only)."""

# Syscall numbers, only for the names used here. aarch64 uses the generic table, which has no
# iopl or ioperm.
_X86_64: dict[str, int] = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "pidfd_getfd": 438,
    "process_madvise": 440,
    "modify_ldt": 154,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "move_mount": 429,
    "open_tree": 428,
    "mount_setattr": 442,
    "open_by_handle_at": 304,
    "name_to_handle_at": 303,
    "quotactl": 179,
    "swapon": 167,
    "swapoff": 168,
    "acct": 163,
    "unshare": 272,
    "setns": 308,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "reboot": 169,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "lookup_dcookie": 212,
    "syslog": 103,
    "iopl": 172,
    "ioperm": 173,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "settimeofday": 164,
    "clock_settime": 227,
    "sethostname": 170,
    "setdomainname": 171,
    "clone": 56,
    "clone3": 435,
}
_AARCH64: dict[str, int] = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "pidfd_getfd": 438,
    "process_madvise": 440,
    "mount": 40,
    "umount2": 39,
    "pivot_root": 41,
    "chroot": 51,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "move_mount": 429,
    "open_tree": 428,
    "mount_setattr": 442,
    "open_by_handle_at": 265,
    "name_to_handle_at": 264,
    "quotactl": 60,
    "swapon": 224,
    "swapoff": 225,
    "acct": 89,
    "unshare": 97,
    "setns": 268,
    "ptrace": 117,
    "process_vm_readv": 270,
    "process_vm_writev": 271,
    "init_module": 105,
    "finit_module": 273,
    "delete_module": 106,
    "kexec_load": 104,
    "kexec_file_load": 294,
    "reboot": 142,
    "bpf": 280,
    "perf_event_open": 241,
    "userfaultfd": 282,
    "lookup_dcookie": 18,
    "syslog": 116,
    "keyctl": 219,
    "add_key": 217,
    "request_key": 218,
    "settimeofday": 170,
    "clock_settime": 112,
    "sethostname": 161,
    "setdomainname": 162,
    "clone": 220,
    "clone3": 435,
}
# platform.machine() -> (AUDIT_ARCH_*, syscall numbers, x32 syscalls share the arch)
_ARCHES: dict[str, tuple[int, dict[str, int], bool]] = {
    "x86_64": (0xC000003E, _X86_64, True),
    "aarch64": (0xC00000B7, _AARCH64, False),
}

# struct seccomp_data: u32 nr, u32 arch, u64 instruction_pointer, u64 args[6] (little-endian)
_OFFSET_NR, _OFFSET_ARCH, _OFFSET_ARG0_LOW = 0, 4, 16
_X32_SYSCALL_BIT = 0x40000000

_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000

_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = seccomp_data[k]
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
_BPF_MAXINSNS = 4096

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_PR_SET_NO_NEW_PRIVS = 38

_Target = int | str  # a jump target: 0 (the next instruction) or a label


def _build(arch: int, numbers: dict[str, int], x32: bool) -> bytes:
    """The filter as an array of `struct sock_filter` {u16 code; u8 jt; u8 jf; u32 k}.

    `numbers` maps syscall names to numbers for `arch`; names of `DENIED` missing from it are
    skipped. Denied syscalls jump to one shared `ret EPERM`, so every jump stays far below the
    255 instructions an 8-bit offset reaches (checked, not assumed).
    """
    program: list[tuple[int, _Target, _Target, int]] = []
    labels: dict[str, int] = {}

    def emit(code: int, k: int, jt: _Target = 0, jf: _Target = 0) -> None:
        program.append((code, jt, jf, k))

    def label(name: str) -> None:
        labels[name] = len(program)

    emit(_LD_W_ABS, _OFFSET_ARCH)
    emit(_JEQ, arch, jf="kill")
    emit(_LD_W_ABS, _OFFSET_NR)
    if x32:
        emit(_JGE, _X32_SYSCALL_BIT, jt="eperm")
    for name in DENIED:
        if name in numbers:
            emit(_JEQ, numbers[name], jt="eperm")
    emit(_JEQ, numbers["clone3"], jt="enosys")
    emit(_JEQ, numbers["clone"], jf="allow")
    emit(_LD_W_ABS, _OFFSET_ARG0_LOW)
    emit(_JSET, _NAMESPACE_FLAGS, jt="eperm")
    label("allow")
    emit(_RET, _RET_ALLOW)
    label("eperm")
    emit(_RET, _RET_ERRNO | errno.EPERM)
    label("enosys")
    emit(_RET, _RET_ERRNO | errno.ENOSYS)
    label("kill")
    emit(_RET, _RET_KILL_PROCESS)

    def offset(at: int, target: _Target) -> int:
        if isinstance(target, int):
            return target
        jump = labels[target] - at - 1
        if not 0 <= jump <= 255:
            raise ValueError(f"seccomp: jump of {jump} from instruction {at} does not fit")
        return jump

    if len(program) > _BPF_MAXINSNS:
        raise ValueError(f"seccomp: {len(program)} instructions, the kernel takes {_BPF_MAXINSNS}")
    return b"".join(
        struct.pack("<HBBI", code, offset(at, jt), offset(at, jf), k)
        for at, (code, jt, jf, k) in enumerate(program)
    )


def _machine() -> str | None:
    """platform.machine() if the filter knows it and this is a 64-bit interpreter."""
    machine = platform.machine()
    if sys.platform.startswith("linux") and machine in _ARCHES and sys.maxsize > 2**32:
        return machine
    return None  # a 32-bit Python on a 64-bit kernel would speak another ABI


def supported() -> bool:
    """Whether `install()` can work here: Linux on x86_64 or aarch64 (64-bit Python)."""
    return _machine() is not None


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_MACHINE = _machine()
_PROGRAM: bytes | None = _build(*_ARCHES[_MACHINE]) if _MACHINE is not None else None
_BUFFER = ctypes.create_string_buffer(_PROGRAM or b"", len(_PROGRAM or b""))  # kept alive
_FPROG = _SockFprog(len(_BUFFER) // 8, ctypes.addressof(_BUFFER))


def install() -> None:
    """Set no_new_privs and install the filter on the calling thread, for good.

    Call it from a single-threaded process (prctl filters only the calling thread; threads
    started later inherit it). no_new_privs also means that setuid binaries run afterwards do
    not gain privileges. Raises OSError, naming the step and what to do, when this platform has
    no syscall table here or the kernel refuses.
    """
    if _PROGRAM is None:
        raise OSError(
            errno.ENOSYS,
            f"seccomp: no syscall table for {platform.machine() or 'this machine'} "
            f"({sys.platform}, {struct.calcsize('P') * 8}-bit Python); the filter knows Linux "
            f"on {' and '.join(_ARCHES)} with a 64-bit Python: run Ember on one of those",
        )
    libc = load_libc()
    if libc is None:  # not reached: _PROGRAM is only built on Linux
        raise OSError(errno.ENOSYS, "seccomp: the C library could not be loaded")
    zero = ctypes.c_ulong(0)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero) != 0:
        err = ctypes.get_errno()
        raise OSError(
            err,
            f"seccomp: prctl(PR_SET_NO_NEW_PRIVS) failed ({os.strerror(err)}); "
            "the kernel needs to be Linux 3.5 or later (see `ember doctor`)",
        )
    mode = ctypes.c_ulong(_SECCOMP_MODE_FILTER)
    if libc.prctl(_PR_SET_SECCOMP, mode, ctypes.byref(_FPROG), zero, zero) != 0:
        err = ctypes.get_errno()
        raise OSError(
            err,
            f"seccomp: the kernel refused the syscall filter (prctl(PR_SET_SECCOMP): "
            f"{os.strerror(err)}); it needs Linux 4.14 or later built with "
            "CONFIG_SECCOMP_FILTER=y (see `ember doctor`)",
        )
