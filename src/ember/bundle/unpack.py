"""Unpack a bundle on the server, trusting nothing in the archive."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import zlib
from pathlib import Path

from ember.bundle.pack import IGNORE_FILE
from ember.errors import TooLarge, UserError

MAX_UNPACKED_BYTES = 256 * 1024 * 1024
MAX_FILES = 10_000
MAX_DEPTH = 64
MAX_PATH_BYTES = 1024

_CHUNK = 64 * 1024
_ENTRY_OVERHEAD = 8 * 1024  # header, pax records, long names and padding, per entry
_HINT = "pack it with `ember deploy`"
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_LINK_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a fifo",
}


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
