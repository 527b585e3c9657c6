"""Bundles: a function directory as a deterministic tar.gz.

`pack` runs on the CLI side, `unpack` on the server (it trusts nothing in the archive), and
`tree_hash` names an unpacked tree by its content.

`.emberignore` in the packed directory adds gitignore-like patterns, one per line: blank lines
and `#` comments are skipped; `name` matches a basename at any depth (fnmatch, so `*.log`);
a pattern containing `/` matches the path from the root (a leading `/` is only an anchor);
a trailing `/` matches directories only. Negation (`!pattern`) is not supported: such lines
are ignored. Note that `*` also matches `/` in anchored patterns.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.errors import TooLarge, UserError

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
MANIFEST_NAMES = ("ember.yaml", "ember.yml")
MAX_UNPACKED_BYTES = 256 * 1024 * 1024
MAX_FILES = 10_000
MAX_DEPTH = 64
MAX_PATH_BYTES = 1024

_CHUNK = 64 * 1024
_ENTRY_OVERHEAD = 8 * 1024  # header, pax records, long names and padding, per entry
_HINT = "pack it with `ember deploy`"
_IGNORE_HINT = f"list it in {IGNORE_FILE}"
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_LINK_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
}


# -- pack (CLI side) -------------------------------------------------------------------------


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


# -- unpack (server side) --------------------------------------------------------------------


class _Corrupt(Exception):
    """The compressed stream is not gzip, or ends early."""


class _Budget:
    """Counts entries and bytes; raises `TooLarge` past the limits."""

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self.bytes = self.files = 0

    def entry(self) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise TooLarge(
                f"bundle has more than {self.max_files} files and directories; "
                f"list what the function does not need in {IGNORE_FILE}",
                code="bundle_too_large",
            )

    def check(self, size: int) -> None:
        if self.bytes + size > self.max_bytes:
            raise _too_big(self.max_bytes)

    def take(self, size: int) -> None:
        self.check(size)
        self.bytes += size

    def stream_limit(self) -> int:
        """How much of the tar stream may have been read: the file data allowed, plus headers
        (pax records, long names, padding) for the entries seen so far and the next one."""
        return self.max_bytes + (self.files + 2) * _ENTRY_OVERHEAD


class _Capped(io.BufferedIOBase):
    """The decompressed tar stream, cut off once it is longer than the budget allows.

    This bounds what tarfile itself reads into memory (pax headers, long names) and the work
    done decompressing a bomb; `_Budget` bounds what is written.
    """

    def __init__(self, data: bytes, budget: _Budget) -> None:
        self._source = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
        self._budget = budget
        self._read = 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._source.close()
        super().close()

    def read(self, size: int | None = -1, /) -> bytes:
        left = self._budget.stream_limit() - self._read
        want = left + 1 if size is None or size < 0 else min(size, left + 1)
        try:
            chunk = self._source.read(want)
        except (OSError, EOFError, zlib.error) as exc:
            raise _Corrupt(str(exc)) from exc
        self._read += len(chunk)
        if len(chunk) > left:
            raise _too_big(self._budget.max_bytes)
        return chunk


class _Layout:
    """What the archive has laid out so far: refuses duplicates and files used as directories."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}  # path -> "file", "dir" or "implied" (a parent)

    def add(self, rel: str, is_dir: bool) -> list[str]:
        """Record `rel`; return the directories to create for it, parents first."""
        parts = rel.split("/")
        parents = ["/".join(parts[:end]) for end in range(1, len(parts))]
        for parent in parents:
            if self.kinds.get(parent) == "file":
                raise _refused(rel, f"is inside {parent!r}, which is a file")
        previous = self.kinds.get(rel)
        if previous is not None and not (previous == "implied" and is_dir):
            raise _refused(rel, "appears more than once")
        new = [parent for parent in parents if parent not in self.kinds]
        self.kinds.update(dict.fromkeys(new, "implied"))
        self.kinds[rel] = "dir" if is_dir else "file"
        return [*new, rel] if is_dir and previous is None else new


def unpack(
    data: bytes,
    dest: Path,
    *,
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
    max_files: int = MAX_FILES,
) -> None:
    """Extract a bundle into `dest` (absent or empty), refusing anything but files and dirs.

    On any failure nothing is left behind: `dest` is removed.
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"cannot unpack a bundle into {str(dest)!r}: it is not empty")
    budget = _Budget(max_unpacked_bytes, max_files)
    try:
        dest.mkdir(mode=0o755, parents=True, exist_ok=True)
        with _Capped(data, budget) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            _extract(tar, dest, budget)
    except (tarfile.TarError, _Corrupt) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UserError(
            f"bundle is not a valid tar.gz archive: {exc}; {_HINT}", code="bad_bundle"
        ) from exc
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _extract(tar: tarfile.TarFile, dest: Path, budget: _Budget) -> None:
    layout = _Layout()
    for member in tar:
        budget.entry()
        rel = _member_path(member.name)
        is_dir = _is_dir(member)
        if rel is None and is_dir:
            continue  # the root itself, as in `tar -C dir .`
        if rel is None:
            raise _refused(member.name, "has no name")
        for directory in layout.add(rel, is_dir):
            path = dest.joinpath(*directory.split("/"))
            path.mkdir(mode=0o755)
            path.chmod(0o755)
        if not is_dir:
            _write(tar, member, dest.joinpath(*rel.split("/")), budget)


def _member_path(name: str) -> str | None:
    """The normalized relative path of a member, None for the root; refuses unsafe names."""
    if not name:
        raise _refused(name, "has an empty name")
    for bad, why in (("\0", "a NUL byte"), ("\\", "a backslash")):
        if bad in name:
            raise _refused(name, f"has {why} in its name")
    if name.startswith("/"):
        raise _refused(name, "is an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _refused(name, "has a '..' segment that would leave the bundle")
    if len(parts) > MAX_DEPTH or len(name.encode()) > MAX_PATH_BYTES:
        raise _refused(
            name[:80],
            f"is nested deeper than {MAX_DEPTH} directories or longer than {MAX_PATH_BYTES} bytes",
        )
    if any(len(part.encode()) > 255 for part in parts):
        raise _refused(name[:80], "has a name longer than 255 bytes")
    return "/".join(parts) or None


def _is_dir(member: tarfile.TarInfo) -> bool:
    if member.type == tarfile.DIRTYPE:
        return True
    if member.type in _FILE_TYPES:
        return False
    kind = _LINK_KINDS.get(member.type, f"an entry of type {member.type!r}")
    raise _refused(member.name, f"is {kind}; a bundle holds only regular files and directories")


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, budget: _Budget) -> None:
    budget.check(member.size)  # refuse a claimed size before reading anything
    source = tar.extractfile(member)
    assert source is not None  # regular files always have content
    mode = 0o755 if member.mode & 0o111 else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as out, source:
        while chunk := source.read(_CHUNK):
            budget.take(len(chunk))
            out.write(chunk)
        os.fchmod(out.fileno(), mode)


def _refused(name: str, problem: str) -> UserError:
    return UserError(f"bundle entry {name!r} {problem}; {_HINT}", code="bad_bundle")


def _too_big(max_bytes: int) -> TooLarge:
    return TooLarge(
        f"bundle unpacks to more than {max_bytes / 2**20:g} MiB; "
        f"list what the function does not need (data, build output) in {IGNORE_FILE}",
        code="bundle_too_large",
    )


# -- reading an unpacked tree ----------------------------------------------------------------


def tree_hash(root: Path) -> str:
    """Hex sha256 over the regular files below `root`: path, exec bit and content, not mtimes.

    Symbolic links and special files are not part of the hash (`unpack` never creates them).
    """
    digest = hashlib.sha256()
    for rel, path, executable in sorted(_regular_files(root), key=lambda item: item[0]):
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
