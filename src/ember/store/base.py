"""The `Store` protocol and the records it keeps."""

from __future__ import annotations

from typing import Protocol

import msgspec

from ember.spec import FunctionSpec, Quota
from ember.telemetry.records import ActivationRecord, LogRecord


class FunctionRecord(msgspec.Struct, frozen=True):
    name: str  # "namespace/name": the key of a function
    revision: int  # the revision that serves
    created_at: float
    updated_at: float


class RevisionRecord(msgspec.Struct, frozen=True):
    function: str  # "namespace/name"
    number: int
    sha256: str  # of the code tree and the canonical config
    bundle: str  # sha256 of the stored bundle blob
    spec: FunctionSpec
    created_at: float


class NamespaceRecord(msgspec.Struct, frozen=True):
    id: int  # its sandbox uid/gid is the server's uid base + id
    name: str
    quota: Quota
    created_at: float


class KeyRecord(msgspec.Struct, frozen=True):
    id: str  # public part of the key, shown by `ember keys ls`
    digest: bytes  # SHA-256 of the secret part; the secret itself is never stored
    name: str
    scopes: list[str]
    rate: float  # requests per second (token bucket refill); 0 = unlimited
    burst: int
    created_at: float
    revoked_at: float | None = None


class SecretRecord(msgspec.Struct, frozen=True):
    namespace: str
    name: str
    sealed: bytes  # AES-GCM nonce + ciphertext + tag
    created_at: float
    updated_at: float


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def functions(self) -> list[FunctionRecord]: ...

    async def function(self, name: str) -> FunctionRecord | None: ...

    async def revisions(self, name: str) -> list[RevisionRecord]: ...

    async def revision(self, name: str, number: int) -> RevisionRecord | None: ...

    async def add_revision(
        self, key: str, spec: FunctionSpec, sha256: str, bundle: str, now: float
    ) -> tuple[RevisionRecord, bool]:
        """Make `sha256` the serving revision of function `key`; False if it already was."""
        ...

    async def delete_function(self, name: str) -> bool: ...

    async def write_telemetry(
        self, activations: list[ActivationRecord], logs: list[LogRecord]
    ) -> None: ...

    async def activations(self, name: str, limit: int) -> list[ActivationRecord]: ...

    async def logs(self, name: str, since: float, after_id: int, limit: int) -> list[LogRecord]: ...

    async def prune(self, keep_activations: int, keep_logs: int) -> None: ...

    async def namespaces(self) -> list[NamespaceRecord]: ...

    async def ensure_namespace(self, name: str, now: float) -> NamespaceRecord: ...

    async def set_quota(self, name: str, quota: Quota) -> NamespaceRecord | None: ...

    async def add_key(self, key: KeyRecord) -> None: ...

    async def keys(self) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str, now: float) -> bool: ...

    async def put_secret(self, namespace: str, name: str, sealed: bytes, now: float) -> None: ...

    async def secrets(self, namespace: str | None = None) -> list[SecretRecord]: ...

    async def delete_secret(self, namespace: str, name: str) -> bool: ...
