"""Deployed bundles on disk: each bundle's blob (so a restart can unpack it again) and its code
directory, EMBER_HOME/code/<bundle sha256>, unpacked once and read-only; and the collection of
old revisions and of the bundles no revision uses any more.

No file-system work that grows with a bundle runs on the event loop: it runs on worker threads.
A removal never races a deploy that recreates the same directory: under the control plane's
write lock the directory is renamed aside, one atomic step after which its name is free (a
deploy unpacks the bundle anew), and what was renamed is deleted afterwards, outside the lock.
Staging and trash directories that a shutdown cut short are swept at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

from ember import bundle
from ember.blobs.base import Blobs
from ember.layers.builder import Layers
from ember.store.base import Store

log = logging.getLogger("ember.api")

STAGING = ".tmp-"  # a bundle being unpacked
TRASH = ".trash-"  # a directory set aside, being deleted
DIGEST_LENGTH = 64  # a code directory's name: the bundle's sha256


def read_only(root: Path) -> None:
    """Code directories are shared by revisions: files lose their write bits. (Zygotes do not
    write `__pycache__` either; byte-compiling here would hold the server's GIL per file.)"""
    root.chmod(0o755)  # readable by the sandboxes' unprivileged uids, writable by none
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode & 0o555)


class Bundles:
    """Everything here that adds or removes a bundle runs under the caller's write lock."""

    def __init__(
        self, code_root: Path, blobs: Blobs, store: Store, retention: int, layers: Layers
    ) -> None:
        self.root = code_root
        self.layers = layers
        self.blobs = blobs
        self.store = store
        self.retention = retention  # revisions kept per function beyond those a pointer names
        self._deleting: set[asyncio.Task[None]] = set()

    def code_dir(self, digest: str) -> Path:
        return self.root / digest

    def staging(self) -> Path:
        """A fresh path to unpack a bundle into; nothing is created yet."""
        return self.root / f"{STAGING}{secrets.token_hex(8)}"

    async def install(self, staging: Path, digest: str) -> bool:
        """Move unpacked code to its content address, read-only. False when that directory is
        there already (the same bundle serves another revision); `staging` stays then."""
        return await asyncio.to_thread(self.install_now, staging, digest)

    def install_now(self, staging: Path, digest: str) -> bool:
        """`install`, blocking: on a worker thread, under the caller's write lock."""
        path = self.code_dir(digest)
        if path.exists():
            return False
        staging.rename(path)
        read_only(path)
        return True

    def place(self, staging: Path, digest: str) -> bool:
        """Move unpacked, read-only code to its content address, under the caller's write
        lock (one rename: on the loop). False when it is there already (the same bundle
        serves another revision); `staging` stays then."""
        path = self.code_dir(digest)
        if path.exists():
            return False
        staging.rename(path)
        return True

    async def ensure_code(self, digest: str) -> Path:
        """The code directory of a stored bundle, unpacked again from its blob when missing
        (after a restart, or when an earlier clean-up took it). One stat on the loop when it
        is there (after every deploy), a worker thread only to unpack it."""
        path = self.code_dir(digest)
        if path.is_dir():
            return path
        return await asyncio.to_thread(self._ensure_code, digest)

    def _ensure_code(self, digest: str) -> Path:
        path = self.code_dir(digest)
        if not path.exists():
            tmp = self.staging()
            bundle.unpack(self.blobs.get(digest), tmp)
            tmp.rename(path)
            read_only(path)
        return path

    async def put_new(self, data: bytes, digest: str) -> bool:
        """Store the blob of bundle `digest`; True if it was not stored yet."""
        return await asyncio.to_thread(self._put_new, data, digest)

    def _put_new(self, data: bytes, digest: str) -> bool:
        if self.blobs.has(digest):
            return False
        self.blobs.put(data)
        return True

    async def drop_blob(self, digest: str) -> None:
        """Delete a blob this deploy stored and no revision came to use."""
        await asyncio.to_thread(self.blobs.delete, digest)

    # ---- removal ----
    async def remove(self, paths: Iterable[Path]) -> None:
        """Set directories aside now, delete them in the background."""
        aside = await asyncio.to_thread(_set_aside, list(paths))
        if aside:
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(_delete, aside))
            self._deleting.add(task)
            task.add_done_callback(self._deleting.discard)

    async def drop_unused(self, candidates: set[str]) -> None:
        """Blobs and code directories of `candidates` that no stored revision uses, and every
        layer none uses (and what an interrupted build left)."""
        unused = candidates - await self.store.bundles_in_use()
        for digest in unused:
            await asyncio.to_thread(self.blobs.delete, digest)
        await self.remove(self.code_dir(digest) for digest in unused)
        used = set(await self.store.layer_revisions())
        await self.remove(await asyncio.to_thread(self.layers.unused, used))

    async def collect(self, key: str) -> None:
        """Keep the newest `retention` revisions of function `key` and every one a pointer
        names (the serving and previous ones, aliases, a running rollout); then drop code and
        blobs no revision uses."""
        fn = await self.store.function(key)
        if fn is None:
            return
        revs = await self.store.revisions(key)
        keep = {r.number for r in revs[-self.retention :]}
        keep |= {fn.revision, fn.previous} | {a.revision for a in fn.aliases}
        if fn.rollout is not None and fn.rollout.state == "running":
            keep |= {fn.rollout.from_revision, fn.rollout.to_revision}
        gone = [r for r in revs if r.number not in keep]
        if not gone:
            return
        await self.store.delete_revisions(key, [r.number for r in gone])
        await self.drop_unused({r.bundle for r in gone})
        log.info("%s: removed %d old revision(s)", key, len(gone))

    async def sweep(self) -> None:
        """At start: bundles no revision uses and directories left half-way by a shutdown."""
        stored = set(await asyncio.to_thread(self.blobs.all))
        names = await asyncio.to_thread(_names, self.root)
        stored |= {name for name in names if len(name) == DIGEST_LENGTH}
        await self.drop_unused(stored)
        await self.remove(self.root / name for name in names if name.startswith((STAGING, TRASH)))

    async def close(self) -> None:
        """Wait for the deletions under way (a cut one is finished by the next start's sweep)."""
        await asyncio.gather(*self._deleting, return_exceptions=True)


def _names(root: Path) -> list[str]:
    return [p.name for p in root.iterdir()] if root.is_dir() else []


def _set_aside(paths: list[Path]) -> list[Path]:
    aside = []
    for path in paths:
        if path.name.startswith(TRASH):
            aside.append(path)
            continue
        target = path.with_name(f"{TRASH}{secrets.token_hex(8)}")
        try:
            path.rename(target)
        except FileNotFoundError:
            continue
        aside.append(target)
    return aside


def _delete(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
