"""Blobs in a directory: `sha256/ab/cdef…`, written to a temp file and renamed (atomic)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ember.errors import NotFound


class LocalBlobs:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise NotFound(f"no blob named {digest!r}")
        return self.root / "sha256" / digest[:2] / digest[2:]

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if path.exists():
            return digest
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return digest

    def get(self, digest: str) -> bytes:
        path = self._path(digest)
        if not path.exists():
            raise NotFound(f"bundle blob {digest[:12]} is missing from {self.root}")
        return path.read_bytes()

    def has(self, digest: str) -> bool:
        return self._path(digest).exists()

    def delete(self, digest: str) -> bool:
        """Remove a blob no revision uses any more; False if it was not there."""
        try:
            self._path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def all(self) -> list[str]:
        """Every stored digest."""
        base = self.root / "sha256"
        if not base.is_dir():
            return []
        return sorted(p.parent.name + p.name for p in base.glob("*/*") if len(p.parent.name) == 2)
