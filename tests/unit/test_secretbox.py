"""The master key file and AES-GCM sealing of secrets bound to their namespace/name."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from ember.errors import PlatformError, UserError
from ember.secretbox import MAX_SECRET_BYTES, SecretBox

NONCE, TAG = 12, 16
VALUE = b"postgres://app:hunter2-correct-horse@db.internal:5432/orders"


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "master.key"


@pytest.fixture
def box(key_path: Path) -> SecretBox:
    return SecretBox.load_or_create(key_path)


def assert_unreadable(box: SecretBox, namespace: str, name: str, sealed: bytes) -> None:
    with pytest.raises(PlatformError) as info:
        box.open(namespace, name, sealed)
    assert info.value.code == "secret_unreadable"
    assert info.value.status == 503


# ---- the master key file ----


def test_creates_key_file_with_mode_0600(key_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask the file is 0600
    try:
        SecretBox.load_or_create(key_path)
    finally:
        os.umask(old)
    st = os.stat(key_path)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 32


def test_new_key_files_hold_different_random_keys(tmp_path: Path) -> None:
    keys = set()
    for i in range(5):
        path = tmp_path / f"k{i}"
        SecretBox.load_or_create(path)
        keys.add(path.read_bytes())
    assert len(keys) == 5
    assert bytes(32) not in keys


def test_key_persists_across_loads(key_path: Path) -> None:
    first = SecretBox.load_or_create(key_path)
    key = key_path.read_bytes()
    sealed = first.seal("a", "db", VALUE)
    second = SecretBox.load_or_create(key_path)
    assert key_path.read_bytes() == key  # loading does not rewrite the key
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert second.open("a", "db", sealed) == VALUE
    assert first.open("a", "db", second.seal("a", "db", b"back")) == b"back"


def test_existing_key_file_is_used(key_path: Path) -> None:
    key = bytes(range(32))
    key_path.write_bytes(key)
    sealed = SecretBox.load_or_create(key_path).seal("a", "db", VALUE)
    assert SecretBox(key).open("a", "db", sealed) == VALUE
    assert key_path.read_bytes() == key


@pytest.mark.parametrize("size", [0, 1, 16, 31, 33, 64])
def test_wrong_length_key_file(key_path: Path, size: int) -> None:
    key_path.write_bytes(b"k" * size)
    with pytest.raises(PlatformError) as info:
        SecretBox.load_or_create(key_path)
    assert info.value.code == "bad_master_key"
    assert str(key_path) in info.value.message
    assert key_path.read_bytes() == b"k" * size  # never replaced: old secrets need it


def test_other_key_cannot_open(tmp_path: Path) -> None:
    sealed = SecretBox.load_or_create(tmp_path / "one").seal("a", "db", VALUE)
    assert_unreadable(SecretBox.load_or_create(tmp_path / "two"), "a", "db", sealed)


# ---- sealing ----


@pytest.mark.parametrize(
    "value",
    [b"", b"x", VALUE, bytes(range(256)) * 4, b"\x00" * 1000, b"z" * MAX_SECRET_BYTES],
    ids=["empty", "one-byte", "url", "binary", "zeros", "max"],
)
def test_round_trip(box: SecretBox, value: bytes) -> None:
    sealed = box.seal("a", "db", value)
    assert isinstance(sealed, bytes)
    assert len(sealed) == NONCE + len(value) + TAG
    assert box.open("a", "db", sealed) == value


def test_nonce_is_random(box: SecretBox) -> None:
    sealed = [box.seal("a", "db", VALUE) for _ in range(20)]
    assert len(set(sealed)) == 20
    assert len({s[:NONCE] for s in sealed}) == 20
    assert len({s[NONCE:] for s in sealed}) == 20  # the ciphertext differs too, not just a prefix
    assert all(box.open("a", "db", s) == VALUE for s in sealed)


@pytest.mark.parametrize(
    "value",
    [VALUE, b"a" * 100, b"same old secret " * 8, bytes(range(256))],
    ids=["url", "repeated-byte", "repeated-phrase", "all-bytes"],
)
def test_plaintext_never_in_sealed_bytes(box: SecretBox, value: bytes) -> None:
    sealed = box.seal("a", "db", value)
    for chunk in (value, value[:8], value[-8:], value[len(value) // 2 :][:8]):
        assert chunk not in sealed
    assert value.hex().encode() not in sealed.lower()


@pytest.mark.parametrize(
    ("namespace", "name"),
    [
        ("a", "other"),  # the sealed value of db copied onto another name
        ("b", "db"),  # same name in another namespace
        ("a", "DB"),
        ("a", "db "),
        ("ab", "db"),
        ("a", "adb"),
        ("", "a/db"),
        ("a/db", ""),
        ("db", "a"),
    ],
)
def test_associated_data_binds_namespace_and_name(
    box: SecretBox, namespace: str, name: str
) -> None:
    sealed = box.seal("a", "db", VALUE)
    assert_unreadable(box, namespace, name, sealed)
    assert box.open("a", "db", sealed) == VALUE


def test_swapped_rows_do_not_open(box: SecretBox) -> None:
    one = box.seal("a", "user", b"admin")
    two = box.seal("a", "password", b"hunter2")
    assert_unreadable(box, "a", "user", two)
    assert_unreadable(box, "a", "password", one)


def test_tampering_is_detected(box: SecretBox) -> None:
    sealed = box.seal("a", "db", VALUE)
    for i in range(len(sealed)):  # every byte: nonce, ciphertext and tag
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        try:
            assert_unreadable(box, "a", "db", bytes(tampered))
        except BaseException as exc:
            raise AssertionError(f"flipping byte {i} of {len(sealed)} went unnoticed") from exc


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda s: s[:-1], id="tag-short-by-one"),
        pytest.param(lambda s: s[:-TAG], id="no-tag"),
        pytest.param(lambda s: s[: NONCE + TAG - 1], id="below-nonce-plus-tag"),
        pytest.param(lambda s: s[:NONCE], id="nonce-only"),
        pytest.param(lambda s: s[:8], id="8-bytes"),
        pytest.param(lambda s: s[1:], id="nonce-short-by-one"),
        pytest.param(lambda s: s + b"\x00", id="extra-byte"),
        pytest.param(lambda s: s[:NONCE] + s[NONCE + 1 :], id="byte-dropped"),
    ],
)
def test_truncated_or_extended_is_unreadable(box: SecretBox, cut: Callable[[bytes], bytes]) -> None:
    sealed = box.seal("a", "db", VALUE)
    assert_unreadable(box, "a", "db", cut(sealed))


@pytest.mark.parametrize("sealed", [b"", b"\x00", b"1234567"], ids=["empty", "1-byte", "7-bytes"])
def test_very_short_sealed_value_is_unreadable(box: SecretBox, sealed: bytes) -> None:
    assert_unreadable(box, "a", "db", sealed)


def test_size_limit(box: SecretBox) -> None:
    assert MAX_SECRET_BYTES == 32 * 1024
    box.seal("a", "db", b"v" * MAX_SECRET_BYTES)
    for size in (MAX_SECRET_BYTES + 1, 2 * MAX_SECRET_BYTES):
        with pytest.raises(UserError) as info:
            box.seal("a", "big", b"v" * size)
        err = info.value
        assert err.status == 413
        assert err.code == "secret_too_large"
        assert "big" in err.message
        assert "vvvv" not in err.message  # the value is never echoed
