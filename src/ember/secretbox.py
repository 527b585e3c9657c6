"""Secrets at rest: AES-256-GCM under a master key kept in `EMBER_HOME/master.key` (mode 0600).

Each value is sealed as nonce (12 random bytes) + ciphertext + tag, with "namespace/name" as
associated data, so a sealed value copied onto another secret's row does not open. The store
only ever sees sealed bytes; values are opened when a function zygote is started and reach it
through the zygote's control channel, never the API, logs or activation records.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ember.errors import PlatformError, UserError

MAX_SECRET_BYTES = 32 * 1024
_NONCE = 12


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, path: Path) -> SecretBox:
        """Read the master key; on first start create it, 0600 from the first byte on."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) != 32:
                raise PlatformError(
                    f"{path} holds {len(key)} bytes, not a 32-byte key; restore it from a "
                    "backup (without it the stored secrets cannot be opened)",
                    code="bad_master_key",
                ) from None
            return cls(key)
        key = AESGCM.generate_key(bit_length=256)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(key)

    def seal(self, namespace: str, name: str, value: bytes) -> bytes:
        if len(value) > MAX_SECRET_BYTES:
            raise UserError(
                f"secret '{name}' is {len(value)} bytes; at most {MAX_SECRET_BYTES // 1024} KB",
                code="secret_too_large",
                status=413,
            )
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._aead.encrypt(nonce, value, f"{namespace}/{name}".encode())

    def open(self, namespace: str, name: str, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(
                sealed[:_NONCE], sealed[_NONCE:], f"{namespace}/{name}".encode()
            )
        except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
            raise PlatformError(
                f"secret '{name}' of namespace '{namespace}' does not open with this server's "
                "master key (was master.key replaced?); set it again with `ember secrets set`",
                code="secret_unreadable",
            ) from None
