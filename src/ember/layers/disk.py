"""A layer's files on disk: sealed read-only, a sandboxed build's archive unpacked, small
files written in one rename."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ember.errors import RequirementsError, TooLarge, UserError

STAGING = ".tmp-"
SITE = "site"  # the installed packages inside a layer directory: what goes on sys.path


def seal(site: Path) -> int:
    """Take the write bits off every installed file (uv hard-links files from its cache: a
    write through one layer would change every copy and the cache); return the tree's size
    in bytes. Sandboxes also see the layer through a read-only mount, as another uid."""
    total = 0
    for dirpath, _, filenames in os.walk(site):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not os.path.islink(path):
                os.chmod(path, st.st_mode & 0o555)
                total += st.st_size
    return total


def unpack_build(archive: bytes, staging: Path, max_bytes: int) -> None:
    """The sandbox's answer, unpacked as carefully as a bundle: files and directories only,
    within the layer's size limit."""
    from ember import bundle

    try:
        bundle.unpack(archive, staging, max_unpacked_bytes=max_bytes * 2, max_files=500_000)
    except (UserError, TooLarge) as exc:
        raise RequirementsError(
            f"the sandboxed build answered with an archive Ember cannot take: {exc.message}",
            code="build_failed",
        ) from None
    for name in ("lock.txt", "build.log", SITE):
        if not (staging / name).exists():
            raise RequirementsError(
                f"the sandboxed build's archive has no {name}", code="build_failed"
            )


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{STAGING}{secrets.token_hex(8)}")
    tmp.write_text(text)
    tmp.rename(path)
