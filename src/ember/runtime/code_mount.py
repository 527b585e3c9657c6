"""A revision's code shown in a layer zygote's sandbox, from outside it.

A function zygote forked from a layer zygote (`layer_zygote.py`) lives in the layer zygote's
mount namespace and has no privilege left to mount anything. So the root zygote, which keeps
its privileges and runs no user code, forks a helper per revision that:

1. clones the code directory's mount as a detached tree (`open_tree(OPEN_TREE_CLONE)`, in the
   host's mount namespace, where the directory is) and makes it read-only, nosuid, nodev
   (`mount_setattr`);
2. enters the layer zygote's mount namespace (`setns`), whose root is the sandbox's root;
3. attaches the tree at `/code/NAME` (`move_mount`) and exits.

Only a mount crosses over: no file descriptor of a host directory ever reaches a process of
the sandbox (one would let it walk out of its root). Linux 5.12 or later (`mount_setattr`).
"""

from __future__ import annotations

import ctypes
import os
import re

from ember.runtime.sandbox import CODE_DIR, SandboxError, _check, _libc

_SYSCALLS = {  # the same numbers on x86_64 and aarch64 (new syscalls share one table)
    "open_tree": 428,
    "move_mount": 429,
    "mount_setattr": 442,
}
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_CLONE_NEWNS = 0x00020000
_MS_PRIVATE = 0x40000  # its copy joins no peer group: nothing propagates in or out
NAME = re.compile(r"^[0-9a-z][0-9a-z.-]{0,63}$")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_code(pidfd: int, source: str, name: str) -> None:
    """Steps 1-3 above, in the calling process (a throw-away fork of the root zygote: it
    changes mount namespace for good). `pidfd` names the layer zygote (the server opened it
    when the layer zygote reported, before any tenant code ran): a pid could be reused."""
    if not NAME.match(name):
        raise SandboxError(0, f"sandbox: {name!r} is not a code directory's name")
    libc = _libc()
    tree = libc.syscall(
        _SYSCALLS["open_tree"],
        _AT_FDCWD,
        os.fsencode(source),
        _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_RECURSIVE,
    )
    if tree < 0:
        _check(-1, f"open_tree of {source}")
    attr = _MountAttr(
        _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, _MS_PRIVATE, 0
    )
    _check(
        libc.syscall(
            _SYSCALLS["mount_setattr"],
            tree,
            b"",
            _AT_EMPTY_PATH | _AT_RECURSIVE,
            ctypes.byref(attr),
            ctypes.sizeof(attr),
        ),
        "mount_setattr (making the code read-only)",
    )
    _check(libc.setns(pidfd, _CLONE_NEWNS), "entering the layer zygote's mounts")  # 5.8+
    target = f"{CODE_DIR}/{name}"
    os.makedirs(target, 0o755, exist_ok=True)
    if os.path.ismount(target):
        return  # shown already (a start that was retried)
    _check(
        libc.syscall(
            _SYSCALLS["move_mount"], tree, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH
        ),
        f"attaching the code at {target}",
    )
