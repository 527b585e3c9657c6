"""Bundles: pack is deterministic and honours .emberignore; unpack refuses hostile archives."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from ember.bundle import pack, read_manifest, tree_hash, unpack
from ember.errors import TooLarge, UserError

BINARY = bytes(range(256)) * 64


def _write(root: Path, files: dict[str, bytes | str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        path.write_bytes(data)
    return root


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path below root: file contents, None for directories."""
    return {
        path.relative_to(root).as_posix(): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


def _names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = _write(
        tmp_path / "project",
        {
            "handler.py": "def handle(req, ctx):\n    return 'hi'\n",
            "data/blob.bin": BINARY,
            "héllo/ünïcødé ✓.txt": "unicode",
            "run.sh": "#!/bin/sh\necho hi\n",
        },
    )
    (root / "run.sh").chmod(0o750)
    (root / "empty").mkdir()
    return root


# -- pack and unpack -------------------------------------------------------------------------


def test_roundtrip_preserves_bytes_names_and_exec_bit(project: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    unpack(pack(project), dest)
    assert _tree(dest) == _tree(project)
    assert (dest / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (dest / "handler.py").stat().st_mode & 0o777 == 0o644
    assert (dest / "empty").stat().st_mode & 0o777 == 0o755
    assert (dest / "data").stat().st_mode & 0o777 == 0o755
    assert tree_hash(dest) == tree_hash(project)


def test_pack_is_deterministic(project: Path) -> None:
    first = pack(project)
    os.utime(project / "handler.py", (1_000_000, 1_000_000))
    assert pack(project) == first
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "data",
        "data/blob.bin",
        "empty",
        "handler.py",
        "héllo",
        "héllo/ünïcødé ✓.txt",
        "run.sh",
    ]
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
            0,
            0,
            0,
            "",
            "",
        )
        assert member.mode in (0o644, 0o755)
    assert gzip.decompress(first)  # a plain gzip stream
    assert first[4:8] == b"\0\0\0\0"  # gzip header mtime


def test_pack_stores_links_inside_as_their_content(project: Path, tmp_path: Path) -> None:
    (project / "alias.py").symlink_to("handler.py")
    (project / "data-link").symlink_to(project / "data")
    dest = tmp_path / "out"
    unpack(pack(project), dest)
    assert not (dest / "alias.py").is_symlink()
    assert (dest / "alias.py").read_bytes() == (project / "handler.py").read_bytes()
    assert (dest / "data-link" / "blob.bin").read_bytes() == BINARY


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda root: (root / "passwd").symlink_to("/etc/passwd"),
            "'passwd': it is a symbolic link",
        ),
        (lambda root: (root / "up").symlink_to(".."), "'up': it is a symbolic link to"),
        (
            lambda root: (root / "loop").symlink_to("."),
            "'loop': it is a symbolic link to a directory",
        ),
        (lambda root: (root / "dangling").symlink_to("missing"), "'dangling': it is a broken"),
        (lambda root: os.mkfifo(root / "pipe"), "'pipe': it is a fifo"),
        (lambda root: (root / "a\\b").write_text("x"), "has a backslash"),
    ],
    ids=["outside", "parent", "cycle", "broken", "fifo", "backslash"],
)
def test_pack_refuses(project: Path, make: Callable[[Path], object], expected: str) -> None:
    make(project)
    with pytest.raises(UserError) as caught:
        pack(project)
    assert caught.value.code == "bad_bundle"
    assert expected in caught.value.message
    assert ".emberignore" in caught.value.message


def test_pack_skips_ignored_links(project: Path) -> None:
    (project / ".venv" / "bin").mkdir(parents=True)
    (project / ".venv" / "bin" / "python").symlink_to("/usr/bin/python3")
    (project / ".emberignore").write_text("passwd\n")
    (project / "passwd").symlink_to("/etc/passwd")
    assert "passwd" not in _names(pack(project))


def test_pack_refuses_a_missing_or_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="it is not a directory"):
        pack(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="it has no files"):
        pack(tmp_path / "empty")


DEFAULT_IGNORED = {".git/HEAD", "__pycache__/m.cpython-311.pyc", "x.pyc", ".venv/lib/a.py"}
IGNORE_CASES = {
    "defaults only": ("", set()),
    "basename at any depth": ("*.log\n", {"app.log", "sub/deep/x.log"}),
    "comments and blanks": ("# a comment\n\n   \n*.log\n", {"app.log", "sub/deep/x.log"}),
    "anchored with slash": ("/app.log\n", {"app.log"}),
    "path from root": ("sub/deep\n", {"sub/deep/x.log", "sub/deep/keep.txt"}),
    "directory only": ("build/\n", {"build/out.js"}),
    "directory only keeps files": ("notes/\n", set()),
    "negation unsupported": ("*.log\n!app.log\n", {"app.log", "sub/deep/x.log"}),
    "glob on path": ("sub/*/keep.txt\n", {"sub/deep/keep.txt"}),
}


@pytest.mark.parametrize(("ignore", "ignored"), IGNORE_CASES.values(), ids=IGNORE_CASES.keys())
def test_emberignore(tmp_path: Path, ignore: str, ignored: set[str]) -> None:
    files = [
        "handler.py",
        "app.log",
        "notes",
        "sub/deep/x.log",
        "sub/deep/keep.txt",
        "build/out.js",
        ".git/HEAD",
        "__pycache__/m.cpython-311.pyc",
        "x.pyc",
        ".venv/lib/a.py",
    ]
    root = _write(tmp_path / "p", dict.fromkeys(files, "x"))
    (root / ".emberignore").write_text(ignore)
    packed = {name for name in _names(pack(root)) if name in files}
    assert packed == set(files) - ignored - DEFAULT_IGNORED


# -- unpack refuses hostile archives ---------------------------------------------------------


def _tgz(*members: tarfile.TarInfo | tuple[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


class _Zeros(io.RawIOBase):
    """A stream of zeros, so a bomb is built without holding it in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def _bomb(size: int = 300 * 2**20) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1) as compressed,
        tarfile.open(fileobj=compressed, mode="w") as tar,
    ):
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, _Zeros(size))
    return buffer.getvalue()


GOOD = ("handler.py", b"def handle(req, ctx): ...\n")

HOSTILE = {
    "parent escape": (_tgz(GOOD, ("../escape.py", b"x")), "'../escape.py' has a '..' segment"),
    "nested escape": (_tgz(GOOD, ("a/../../x", b"x")), "'a/../../x' has a '..' segment"),
    "absolute": (_tgz(GOOD, ("/etc/cron.d/x", b"x")), "'/etc/cron.d/x' is an absolute path"),
    "backslash": (_tgz(("..\\x", b"x")), "has a backslash in its name"),
    "nul byte": (_tgz(_info("x", pax_headers={"path": "a\0b"})), "'a\\x00b' has a NUL byte"),
    "empty name": (_tgz(_info("")), "'' has an empty name"),
    "dot name file": (_tgz(_info("./")), "'./' has no name"),
    "symlink": (
        _tgz(GOOD, _info("s", tarfile.SYMTYPE, linkname="/etc/passwd")),
        "is a symbolic link",
    ),
    "hard link": (_tgz(GOOD, _info("h", tarfile.LNKTYPE, linkname="handler.py")), "is a hard link"),
    "char device": (
        _tgz(_info("tty", tarfile.CHRTYPE, devmajor=5, devminor=0)),
        "is a character device",
    ),
    "block device": (_tgz(_info("sda", tarfile.BLKTYPE, devmajor=8)), "is a block device"),
    "fifo": (_tgz(_info("pipe", tarfile.FIFOTYPE)), "'pipe' is a fifo"),
    "duplicate": (_tgz(GOOD, GOOD), "'handler.py' appears more than once"),
    "duplicate dir": (
        _tgz(_info("d", tarfile.DIRTYPE), _info("d/", tarfile.DIRTYPE)),
        "appears more",
    ),
    "file as directory": (
        _tgz(GOOD, ("handler.py/x", b"")),
        "is inside 'handler.py', which is a file",
    ),
    "file over directory": (_tgz(("d/x", b""), ("d", b"")), "'d' appears more than once"),
}


@pytest.mark.parametrize(("data", "expected"), HOSTILE.values(), ids=HOSTILE.keys())
def test_unpack_refuses(tmp_path: Path, data: bytes, expected: str) -> None:
    dest = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        unpack(data, dest)
    assert type(caught.value) is UserError
    assert (caught.value.code, caught.value.status) == ("bad_bundle", 400)
    assert expected in caught.value.message
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


TOO_LARGE = {
    "many small files": (
        lambda: _tgz(*((f"f{i}", bytes(300 * 1024)) for i in range(4))),
        {},
        "bundle unpacks to more than 1 MiB",
    ),
    "huge pax header": (
        lambda: _tgz(_info("x", pax_headers={"comment": "x" * 30 * 2**20})),
        {},
        "bundle unpacks to more than 1 MiB",
    ),
    "too many files": (
        lambda: _tgz(*((f"d/f{i}", b"") for i in range(11))),
        {"max_files": 10},
        "bundle has more than 10 files and directories",
    ),
}


@pytest.mark.parametrize(("make", "limits", "expected"), TOO_LARGE.values(), ids=TOO_LARGE.keys())
def test_unpack_refuses_too_large(
    tmp_path: Path, make: Callable[[], bytes], limits: dict[str, int], expected: str
) -> None:
    dest = tmp_path / "out"
    with pytest.raises(TooLarge) as caught:
        unpack(make(), dest, **{"max_unpacked_bytes": 2**20, **limits})
    assert (caught.value.code, caught.value.status) == ("bundle_too_large", 413)
    assert expected in caught.value.message
    assert not dest.exists()


def test_the_bomb_is_small_and_rejected_before_writing(tmp_path: Path) -> None:
    data = _bomb()
    assert len(data) < 2 * 2**20
    with pytest.raises(TooLarge):
        unpack(data, tmp_path / "out", max_unpacked_bytes=2**20)
    assert not (tmp_path / "out").exists()


NOT_ARCHIVES = {
    "garbage": b"this is not a bundle",
    "empty": b"",
    "gzip of text": gzip.compress(b"hello " * 200),
    "truncated": _tgz(GOOD, ("data.bin", BINARY * 4))[:-200],
    "plain tar": b"",  # replaced below by an uncompressed tar
}


def _plain_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("handler.py")
        tar.addfile(info, io.BytesIO())
    return buffer.getvalue()


NOT_ARCHIVES["plain tar"] = _plain_tar()


@pytest.mark.parametrize("data", NOT_ARCHIVES.values(), ids=NOT_ARCHIVES.keys())
def test_unpack_refuses_what_is_not_a_tar_gz(tmp_path: Path, data: bytes) -> None:
    dest = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        unpack(data, dest)
    assert caught.value.code == "bad_bundle"
    assert caught.value.message.startswith("bundle is not a valid tar.gz archive: ")
    assert caught.value.message.endswith("; pack it with `ember deploy`")
    assert not dest.exists()


def test_unpack_accepts_tar_style_names(tmp_path: Path) -> None:
    data = _tgz(
        _info("./", tarfile.DIRTYPE, mode=0o775),
        ("./handler.py", b"x"),
        _info("./bin/tool", size=0, mode=0o700),
        _info("./lib/", tarfile.DIRTYPE, mode=0o700),
    )
    dest = tmp_path / "out"
    unpack(data, dest)
    assert _tree(dest) == {"bin": None, "bin/tool": b"", "handler.py": b"x", "lib": None}
    assert (dest / "bin" / "tool").stat().st_mode & 0o777 == 0o755
    assert (dest / "lib").stat().st_mode & 0o777 == 0o755
    assert (dest / "bin").stat().st_mode & 0o777 == 0o755


def test_unpack_into_an_empty_directory(project: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    unpack(pack(project), dest)
    assert (dest / "handler.py").exists()


def test_unpack_refuses_a_non_empty_destination(project: Path, tmp_path: Path) -> None:
    dest = _write(tmp_path / "out", {"keep.txt": "mine"})
    with pytest.raises(FileExistsError):
        unpack(pack(project), dest)
    assert (dest / "keep.txt").read_text() == "mine"


# -- tree_hash and read_manifest -------------------------------------------------------------


def test_tree_hash_is_stable(project: Path) -> None:
    first = tree_hash(project)
    os.utime(project / "handler.py", (1_000_000, 1_000_000))
    assert tree_hash(project) == first
    assert len(first) == 64


@pytest.mark.parametrize(
    "change",
    [
        lambda root: (root / "handler.py").write_text("changed"),
        lambda root: (root / "handler.py").chmod(0o755),
        lambda root: (root / "handler.py").rename(root / "handler2.py"),
        lambda root: (root / "empty" / "new.txt").write_text(""),
    ],
    ids=["content", "exec bit", "rename", "new file"],
)
def test_tree_hash_changes(project: Path, change: Callable[[Path], object]) -> None:
    before = tree_hash(project)
    change(project)
    assert tree_hash(project) != before


def test_read_manifest(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    (tmp_path / "ember.yml").write_text("functions: {a: {}}\n")
    assert read_manifest(tmp_path) == "functions: {a: {}}\n"
    (tmp_path / "ember.yaml").write_text("functions: {b: {}}\n")
    with pytest.raises(UserError, match=r"both ember\.yaml and ember\.yml exist"):
        read_manifest(tmp_path)
    (tmp_path / "ember.yml").unlink()
    (tmp_path / "ember.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match=r"ember\.yaml is not UTF-8 text"):
        read_manifest(tmp_path)
