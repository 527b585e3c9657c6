"""Process hygiene after a fork: die with the parent, default signals, limits, fresh randomness."""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C module `signal` wraps
import ctypes
import fcntl
import os
import resource
import signal
import socket
import struct
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc: ctypes.CDLL | None = None
_subreaper = 0  # the pid that became a child subreaper in this process or the one forked from


def load_libc() -> ctypes.CDLL | None:
    """The C library, loaded once (with errno) for every ctypes call of the runtime: limits,
    the sandbox and the seccomp filter; None off Linux.

    The interpreter links it already, so its own symbols are the C library's: no
    `ctypes.util.find_library`, whose import (shutil, bz2, lzma: four more shared objects)
    would sit in the root zygote's memory and be copied, as page tables, by every fork."""
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def die_with_parent(parent: int, *, in_new_pid_namespace: bool = False) -> None:
    """PR_SET_PDEATHSIG: nothing may outlive the server, even after a kill -9.

    The first process of a new pid namespace sees its parent as pid 0, so it cannot check
    whether the parent died before prctl took effect; its control channel's EOF ends it then.
    """
    libc = load_libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
        expected = 0 if in_new_pid_namespace else parent
        if os.getppid() != expected:  # the parent died before prctl took effect
            os._exit(1)


def become_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: orphans below this process are reparented to it, not to init.

    The root zygote is one, so a function zygote whose sandbox-entry parent exited after
    placing it (`sandbox.split`) becomes the root's child, dies with it and is reaped by it.
    """
    global _subreaper
    libc = load_libc()
    if libc is not None and libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
        _subreaper = os.getpid()


def own_children() -> list[int]:
    """This process's children now, from /proc (empty where it cannot tell)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(word) for word in f.read().split()]
    except (OSError, ValueError):
        return []


def parent_is_subreaper() -> bool:
    """Whether this process was forked by one that called `become_subreaper` (the flag is
    remembered across fork, the pid says whose it was)."""
    return _subreaper != 0 and _subreaper == os.getppid()


def set_death_signal(sig: int) -> None:
    """PR_SET_PDEATHSIG with `sig` (0 clears it), without the check `die_with_parent` does."""
    libc = load_libc()
    if libc is not None and libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")


_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def isolate_network() -> None:
    """A network namespace of our own with loopback up: no route to the host or anywhere."""
    libc = load_libc()
    if libc is None or libc.unshare(_CLONE_NEWNET) != 0:
        err = ctypes.get_errno() if libc is not None else 0
        raise PermissionError(
            f"network: none needs a new network namespace, which this host refused "
            f"({os.strerror(err) if err else 'not Linux'}); run Ember as root or with user "
            "namespaces (see `ember doctor`), or use network: host"
        )
    loopback_up()


def loopback_up() -> None:
    """In a fresh network namespace `lo` exists but is down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | _IFF_UP, b""))


def anon_kb() -> int:
    """Resident anonymous memory of this process (not page cache, not mapped files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


# Plain numbers for the C functions under `signal`: its Python wrappers convert each old
# handler to an enum, which for a function raises and catches a ValueError inside `enum`; in
# a new instance, whose every first touch of a page copies it, that cost 0.12 ms and 29 pages.
_RESET = tuple(int(s) for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1))
_SIGINT, _SIGKILL, _SIG_DFL = int(signal.SIGINT), int(signal.SIGKILL), int(signal.SIG_DFL)


def default_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in _RESET:
        _signal.signal(sig, _SIG_DFL)
    _signal.signal(_SIGINT, signal.default_int_handler)


def close_fds_except(*keep: int) -> None:
    keep_set = sorted({0, 1, 2, *keep})
    low = 3
    for fd in keep_set:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 65536)


def limit_address_space(extra_bytes: int) -> None:
    """Fallback memory limit: allow `extra_bytes` of address space beyond what is mapped now."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    limit = pages * os.sysconf("SC_PAGE_SIZE") + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def reseed() -> None:
    """`random` reseeds itself after fork; generators it does not know are reseeded here."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
