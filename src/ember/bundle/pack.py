"""Pack a function directory into a deterministic tar.gz (the CLI side).

`.emberignore` in the packed directory adds gitignore-like patterns, one per line: blank lines
and `#` comments are skipped; `name` matches a basename at any depth (fnmatch, so `*.log`);
a pattern containing `/` matches the path from the root (a leading `/` is only an anchor);
a trailing `/` matches directories only. Negation (`!pattern`) is not supported: such lines
are ignored. Note that `*` also matches `/` in anchored patterns.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.errors import UserError

DEFAULT_IGNORES = (
    ".git",
    "__pycache__",
    "*.pyc",
    ".venv",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
)
IGNORE_FILE = ".emberignore"

_IGNORE_HINT = f"list it in {IGNORE_FILE}"


@dataclass(frozen=True)
class _Pattern:
    glob: str
    anchored: bool  # match the path from the root, not the basename
    dir_only: bool

    def matches(self, rel: str, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        subject = rel if self.anchored else rel.rpartition("/")[2]
        return fnmatch.fnmatchcase(subject, self.glob)


@dataclass(frozen=True)
class _Entry:
    rel: str  # POSIX path inside the bundle
    source: Path | None  # the file to read; None for a directory
    mode: int


def pack(directory: Path) -> bytes:
    """The directory's contents as a deterministic tar.gz, honouring `.emberignore`."""
    if not directory.is_dir():
        raise UserError(
            f"cannot pack {str(directory)!r}: it is not a directory; "
            "pass the directory holding your function's code",
            code="bad_bundle",
        )
    root = directory.resolve()
    entries = list(_Walker(root, _load_ignores(root)).walk(root, "", frozenset({root})))
    if not any(entry.source for entry in entries):
        raise UserError(
            f"cannot pack {str(directory)!r}: it has no files (or all are ignored); "
            "add your function's code, e.g. handler.py",
            code="bad_bundle",
        )
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for entry in entries:
            _add(tar, entry)
    return buffer.getvalue()


def _load_ignores(root: Path) -> tuple[_Pattern, ...]:
    path = root / IGNORE_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    patterns = (_parse_ignore(line) for line in (*DEFAULT_IGNORES, *lines))
    return tuple(pattern for pattern in patterns if pattern is not None)


def _parse_ignore(line: str) -> _Pattern | None:
    line = line.strip()
    if not line or line.startswith(("#", "!")):
        return None
    dir_only = line.endswith("/")
    glob = line.rstrip("/")
    anchored = "/" in glob
    glob = glob.lstrip("/")
    return _Pattern(glob, anchored, dir_only) if glob else None


@dataclass(frozen=True)
class _Walker:
    root: Path  # a real path: no symbolic links in it
    ignores: tuple[_Pattern, ...]

    def walk(self, directory: Path, prefix: str, seen: frozenset[Path]) -> Iterator[_Entry]:
        """Entries below the real `directory`, parents first, sorted by name at each level.

        `seen` holds the real directories being walked, to refuse links back up the tree.
        """
        for path in sorted(directory.iterdir(), key=lambda path: path.name):
            rel = f"{prefix}{path.name}"
            if not any(pattern.matches(rel, path.is_dir()) for pattern in self.ignores):
                yield from self.entries(path, rel, seen)

    def entries(self, path: Path, rel: str, seen: frozenset[Path]) -> Iterator[_Entry]:
        if "\\" in rel:
            raise _unpackable(rel, "has a backslash in its name, which bundles do not allow")
        real = self.follow(path, rel) if path.is_symlink() else path
        mode = real.stat().st_mode
        if stat.S_ISDIR(mode):
            if real in seen:
                raise _unpackable(rel, "is a symbolic link to a directory that contains it")
            yield _Entry(rel, None, 0o755)
            yield from self.walk(real, f"{rel}/", seen | {real})
        elif stat.S_ISREG(mode):
            yield _Entry(rel, real, 0o755 if mode & 0o111 else 0o644)
        else:
            raise _unpackable(
                rel, f"is {_file_kind(mode)}; only files and directories can be packed"
            )

    def follow(self, link: Path, rel: str) -> Path:
        """The real path a symbolic link points to, which must be inside the root."""
        try:
            target = link.resolve(strict=True)
        except (OSError, RuntimeError):  # missing target, or a loop of links
            raise _unpackable(rel, "is a broken symbolic link") from None
        if not target.is_relative_to(self.root):
            raise _unpackable(rel, f"is a symbolic link to {str(target)!r}, outside the directory")
        return target


def _add(tar: tarfile.TarFile, entry: _Entry) -> None:
    info = tarfile.TarInfo(entry.rel)
    info.mode = entry.mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.source is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        return
    with open(entry.source, "rb") as content:
        info.size = os.fstat(content.fileno()).st_size
        tar.addfile(info, content)


def _unpackable(rel: str, problem: str) -> UserError:
    return UserError(
        f"cannot pack {rel!r}: it {problem}; remove it or {_IGNORE_HINT}", code="bad_bundle"
    )


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"
