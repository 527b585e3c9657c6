"""The seccomp filter, tried in forked children: the test process itself is never filtered.

Every probe below is harmless even without the filter, although the tests run as root: invalid
flags, magic numbers or paths make the kernel refuse before anything happens (the test that runs
them unfiltered shows it).
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import platform
import resource
import signal
import struct
import subprocess
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from ember.runtime import seccomp


@pytest.fixture(scope="module", autouse=True)
def _seccomp_here() -> None:
    """Skip where the filter cannot work; under CI=true that is a failure, never a skip."""
    if seccomp.supported():
        return
    why = "seccomp needs Linux on x86_64 or aarch64 with a 64-bit Python"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {why}", pytrace=False)
    pytest.skip(why)


MACHINE = platform.machine()
NUMBERS = seccomp._ARCHES[MACHINE][1] if MACHINE in seccomp._ARCHES else {}

CLONE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
SIGCHLD = int(signal.SIGCHLD)

_NOWHERE = b"/nonexistent/ember-seccomp-test"
_BAD = 0x40000000  # a flag bit no probed syscall defines: EINVAL before anything happens
_KEXEC_BAD = 0x8000  # not a kexec flag and outside its architecture field

# Refusals a host may make by policy before our arguments are even looked at: kernel lockdown
# (Secure Boot), kernel.modules_disabled, kernel.kexec_load_disabled, the perf/bpf/uffd sysctls.
HOST_MAY_REFUSE = {
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "iopl",
    "ioperm",
    "bpf",
    "perf_event_open",
    "userfaultfd",
}

# Arguments that make each denied syscall fail (or do nothing) even without the filter.
PROBES: dict[str, tuple[int | bytes | None, ...]] = {
    "mount": (_NOWHERE, _NOWHERE, b"tmpfs", 0, None),  # ENOENT
    "umount2": (_NOWHERE, 0),  # ENOENT
    "pivot_root": (_NOWHERE, _NOWHERE),  # ENOENT
    "chroot": (_NOWHERE,),  # ENOENT
    "fsopen": (b"tmpfs", _BAD),  # EINVAL
    "fsconfig": (-1, 0xFFFF, None, None, 0),  # EINVAL / EBADF
    "fsmount": (-1, _BAD, 0),  # EINVAL
    "fspick": (-1, None, _BAD),  # EINVAL
    "move_mount": (-1, None, -1, None, _BAD),  # EINVAL
    "open_tree": (-1, None, _BAD),  # EINVAL
    "mount_setattr": (-1, None, _BAD, None, 0),  # EINVAL
    "open_by_handle_at": (-1, None, 0),  # EFAULT
    "name_to_handle_at": (-1, None, None, None, _BAD),  # EINVAL
    "quotactl": (0, None, 0, None),  # ENODEV: no block device named
    "swapon": (_NOWHERE, 0),  # ENOENT
    "swapoff": (_NOWHERE,),  # ENOENT
    "acct": (_NOWHERE,),  # ENOENT (acct(NULL) would switch accounting off)
    "unshare": (0,),  # succeeds and does nothing
    "setns": (-1, 0),  # EBADF
    "ptrace": (2, 0, 0, 0),  # PTRACE_PEEKDATA of pid 0: ESRCH
    "process_vm_readv": (0, None, 0, None, 0, 1),  # EINVAL: flags
    "process_vm_writev": (0, None, 0, None, 0, 1),  # EINVAL: flags
    "init_module": (None, 0, None),  # ENOEXEC: too short for an ELF (ENOSYS: no modules)
    "finit_module": (-1, b"", 0),  # EBADF
    "delete_module": (None, 0),  # EFAULT
    "kexec_load": (
        0,
        0,
        None,
        _KEXEC_BAD,
    ),  # EINVAL: flags (0 segments would unload a loaded image)
    "kexec_file_load": (-1, -1, 0, None, _KEXEC_BAD),  # EINVAL: flags
    "reboot": (0, 0, 0, None),  # EINVAL: wrong magic
    "bpf": (0x7FFF, None, 0),  # EINVAL: no such command
    "perf_event_open": (None, 0, -1, -1, ~0),  # EINVAL: flags
    "userfaultfd": (0x7FFFFFFF,),  # EINVAL: flags
    "lookup_dcookie": (0, None, 0),  # ENOSYS since Linux 6.8, EFAULT or EINVAL before
    "syslog": (0x7FFF, None, 0),  # EINVAL: no such action
    "iopl": (4,),  # EINVAL: levels are 0-3
    "ioperm": (0xFFFFFFFF, 1, 0),  # EINVAL: beyond the I/O bitmap
    "keyctl": (0x7FFF, 0, 0, 0, 0),  # EOPNOTSUPP: no such command
    "add_key": (None, None, None, 0, 0),  # EFAULT
    "request_key": (None, None, None, 0),  # EFAULT
    "settimeofday": (None, None),  # succeeds and does nothing
    "clock_settime": (1, None),  # EINVAL: CLOCK_MONOTONIC cannot be set
    "sethostname": (None, 1000),  # EINVAL: longer than 64
    "setdomainname": (None, 1000),  # EINVAL: longer than 64
    "io_uring_setup": (0, None),  # EINVAL: zero entries (EFAULT: no params)
    "io_uring_enter": (-1, 0, 0, 0, None, 0),  # EBADF
    "io_uring_register": (-1, 0, None, 0),  # EBADF
    "pidfd_getfd": (-1, 0, 0),  # EBADF
    "process_madvise": (-1, None, 0, 0, 0),  # EBADF
    "modify_ldt": (0, None, 0),  # reads 0 bytes of the LDT: does nothing
}


def _syscall(nr: int, *args: int | bytes | None) -> tuple[int, int]:
    """libc.syscall(nr, *args) -> (result, errno)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    converted = [
        ctypes.c_char_p(a) if isinstance(a, bytes) else ctypes.c_long(a or 0) for a in args
    ]
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *converted)
    return result, ctypes.get_errno() if result == -1 else 0


def _in_child(body: Callable[[], Any], *, filtered: bool = True) -> Any:
    """Run `body` in a forked child (with the filter installed first) and return its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            if filtered:
                seccomp.install()
            reply = {"ok": body()}
        except BaseException:
            reply = {"error": traceback.format_exc()}
        try:
            os.write(w, json.dumps(reply).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    reply = json.loads(b"".join(chunks))
    assert "error" not in reply, reply.get("error")
    return reply["ok"]


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _probe_all() -> dict[str, list[int]]:
    return {
        name: list(_syscall(NUMBERS[name], *PROBES[name]))
        for name in seccomp.DENIED
        if name in NUMBERS
    }


def _clone(flags: int) -> tuple[int, int]:
    """clone(flags) like fork; a child it makes by mistake ends at once."""
    result, err = _syscall(NUMBERS["clone"], flags | SIGCHLD, 0, 0, 0, 0)
    if result == 0:  # pragma: no cover - the new child (only plain clones get this far)
        os._exit(0)
    if result > 0:
        os.waitpid(result, 0)
    return result, err


def test_every_denied_syscall_fails_with_eperm() -> None:
    assert set(PROBES) == set(seccomp.DENIED)
    results = _in_child(_probe_all)
    assert set(results) == {name for name in seccomp.DENIED if name in NUMBERS}
    assert {name: tuple(got) for name, got in results.items()} == dict.fromkeys(
        results, (-1, errno.EPERM)
    )


def test_the_probes_are_harmless_and_the_filter_is_what_refuses_them() -> None:
    """Unfiltered, the same calls do nothing and (as root, without a filter) are not EPERM."""
    results = _in_child(_probe_all, filtered=False)
    done = {name for name, (result, _) in results.items() if result != -1}
    assert done <= {"unshare", "settimeofday", "modify_ldt"}, "only the no-op probes may succeed"
    if os.geteuid() == 0 and _status().get("Seccomp") == "0":  # not in a filtered container
        refused = {name for name, (_, err) in results.items() if err == errno.EPERM}
        assert refused <= HOST_MAY_REFUSE


def test_clone_with_a_namespace_flag_is_refused_and_clone3_is_enosys() -> None:
    def body() -> dict[str, list[int]]:
        got = {name: list(_clone(flag)) for name, flag in CLONE_FLAGS.items()}
        got["all"] = list(_clone(sum(CLONE_FLAGS.values())))
        got["clone3"] = list(_syscall(NUMBERS["clone3"], None, 0))  # EINVAL without the filter
        return got

    got = _in_child(body)
    assert got.pop("clone3") == [-1, errno.ENOSYS]
    assert got == {key: [-1, errno.EPERM] for key in [*CLONE_FLAGS, "all"]}


def test_ordinary_process_life_goes_on() -> None:
    def body() -> dict[str, Any]:
        got: dict[str, Any] = {"pid": os.getpid() > 0, "ppid": os.getppid() > 0}
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the grandchild
            os._exit(7)
        got["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        got["plain clone"] = _clone(0)[0] > 0
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
        thread.start()
        thread.join()
        got["thread"] = len(seen) == 1 and seen[0] != threading.get_native_id()
        got["subprocess"] = subprocess.run(["/bin/true"], check=False).returncode
        with open("/proc/self/status") as f:
            got["open"] = "Seccomp" in f.read()
        got["personality"] = _syscall(135 if MACHINE == "x86_64" else 92, 0xFFFFFFFF)[1]
        return got

    assert _in_child(body) == {
        "pid": True,
        "ppid": True,
        "fork": 7,
        "plain clone": True,
        "thread": True,
        "subprocess": 0,
        "open": True,
        "personality": 0,  # personality(0xffffffff) only reads it: not denied
    }


def test_the_filter_is_inherited_by_grandchildren_and_across_exec() -> None:
    def body() -> dict[str, Any]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the grandchild
            result = _syscall(NUMBERS["unshare"], 0)
            os.write(w, json.dumps([*result, _status()["Seccomp"]]).encode())
            os._exit(0)
        os.close(w)
        grandchild = json.loads(os.read(r, 4096))
        os.waitpid(pid, 0)
        exec_status = subprocess.run(
            ["grep", "-E", "^(Seccomp|NoNewPrivs):", "/proc/self/status"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return {"grandchild": grandchild, "exec": exec_status}

    assert _in_child(body) == {
        "grandchild": [-1, errno.EPERM, "2"],  # 2: SECCOMP_MODE_FILTER
        "exec": ["NoNewPrivs:", "1", "Seccomp:", "2"],
    }


@pytest.mark.skipif(MACHINE != "x86_64", reason="x32 and i386 are x86_64 ABIs")
def test_other_abis_cannot_go_around_the_list() -> None:
    def body() -> dict[str, Any]:
        got: dict[str, Any] = {"x32 getpid": list(_syscall(0x40000000 | 39))}
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the grandchild: i386 getpid through int 0x80
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            ctypes.CDLL(None).prctl(4, ctypes.c_ulong(0), 0, 0, 0)  # PR_SET_DUMPABLE: no core
            code = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"  # mov eax, 20; int 0x80; ret
            page = mmap.mmap(
                -1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
            )
            page.write(code)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            ctypes.CFUNCTYPE(ctypes.c_long)(address)()
            os._exit(0)
        got["i386 getpid"] = os.waitpid(pid, 0)[1]
        return got

    got = _in_child(body)
    assert got["x32 getpid"] == [-1, errno.EPERM]
    assert os.WIFSIGNALED(got["i386 getpid"])
    assert os.WTERMSIG(got["i386 getpid"]) == signal.SIGSYS


def _decode(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack("<HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]


@pytest.mark.parametrize("machine", sorted(seccomp._ARCHES))
def test_the_program_is_well_formed_for_each_machine(machine: str) -> None:
    arch, numbers, x32 = seccomp._ARCHES[machine]
    absent = {"iopl", "ioperm", "modify_ldt"} if machine == "aarch64" else set()
    assert set(numbers) == set(seccomp.DENIED) - absent | {"clone", "clone3"}
    assert len(set(numbers.values())) == len(numbers)
    assert {"personality", "clone", "clone3"}.isdisjoint(seccomp.DENIED)
    program = seccomp._build(arch, numbers, x32)
    if machine == MACHINE:
        assert program == seccomp._PROGRAM
    instructions = _decode(program)
    for at, (code, jt, jf, _k) in enumerate(instructions):
        assert code in (0x20, 0x15, 0x35, 0x45, 0x06)
        if code & 0x07 == 0x05:  # a jump lands inside the program
            assert at + 1 + max(jt, jf) < len(instructions)
    assert instructions[0] == (0x20, 0, 0, 4)  # A = arch
    assert instructions[1] == (0x15, 0, len(instructions) - 3, arch)  # else: the last one
    assert instructions[-1] == (0x06, 0, 0, 0x80000000)  # kill the process
    assert instructions[-4] == (0x06, 0, 0, 0x7FFF0000)  # allow
    denied = {k for code, jt, _jf, k in instructions[2:] if code == 0x15 and jt > 0}
    assert denied == set(numbers.values()) - {numbers["clone"]}


def test_a_jump_too_far_is_refused() -> None:
    numbers = {f"n{i}": i for i in range(300)} | {"clone": 1000, "clone3": 1001}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(seccomp, "DENIED", tuple(numbers))
        with pytest.raises(ValueError, match="does not fit"):
            seccomp._build(0xC000003E, numbers, False)


def test_install_refuses_an_unknown_machine() -> None:
    def body() -> str:
        seccomp._PROGRAM = None  # in the child only
        try:
            seccomp.install()
        except OSError as exc:
            return f"{exc.errno} {exc.strerror} {_status()['Seccomp']}"
        return "installed"

    message = _in_child(body, filtered=False)
    assert message.startswith(f"{errno.ENOSYS} seccomp: no syscall table for {MACHINE}")
    assert message.endswith(" 0")  # nothing was installed
