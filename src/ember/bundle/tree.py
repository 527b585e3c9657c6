"""Naming an unpacked tree by its content, and finding its manifest."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ember.errors import UserError

MANIFEST_NAMES = ("ember.yaml", "ember.yml")


def tree_hash(root: Path, skip: frozenset[str] = frozenset()) -> str:
    """Hex sha256 over the regular files below `root`: path, exec bit and content, not mtimes.

    Symbolic links and special files are not part of the hash (`unpack` never creates them);
    neither are the relative paths in `skip` (e.g. the manifest, for a code-only hash).
    """
    digest = hashlib.sha256()
    for rel, path, executable in sorted(_regular_files(root), key=lambda item: item[0]):
        if rel in skip:
            continue
        with open(path, "rb") as content:
            file_digest = hashlib.file_digest(content, "sha256").hexdigest()
        flag = "x" if executable else "-"
        digest.update(os.fsencode(rel) + f"\0{flag}\0{file_digest}\n".encode())
    return digest.hexdigest()


def _regular_files(root: Path) -> Iterator[tuple[str, Path, bool]]:
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode):
                yield path.relative_to(root).as_posix(), path, bool(mode & 0o111)


def read_manifest(root: Path) -> str | None:
    """The text of `root/ember.yaml` (or `ember.yml`), None when there is none."""
    present = [root / name for name in MANIFEST_NAMES if (root / name).is_file()]
    if len(present) > 1:
        raise UserError(
            "both ember.yaml and ember.yml exist; keep one of them", code="bad_manifest"
        )
    if not present:
        return None
    try:
        return present[0].read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{present[0].name} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8",
            code="bad_manifest",
        ) from None
