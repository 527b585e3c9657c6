"""The `Store` protocol and the records it keeps."""

from __future__ import annotations

from typing import Protocol

import msgspec

from ember.spec import FunctionSpec
from ember.telemetry.records import ActivationRecord, LogRecord


class FunctionRecord(msgspec.Struct, frozen=True):
    name: str
    revision: int  # the revision that serves
    created_at: float
    updated_at: float


class RevisionRecord(msgspec.Struct, frozen=True):
    function: str
    number: int
    sha256: str  # of the code tree and the canonical config
    bundle: str  # sha256 of the stored bundle blob
    spec: FunctionSpec
    created_at: float


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def functions(self) -> list[FunctionRecord]: ...

    async def function(self, name: str) -> FunctionRecord | None: ...

    async def revisions(self, name: str) -> list[RevisionRecord]: ...

    async def revision(self, name: str, number: int) -> RevisionRecord | None: ...

    async def add_revision(
        self, spec: FunctionSpec, sha256: str, bundle: str, now: float
    ) -> tuple[RevisionRecord, bool]:
        """Make `sha256` the function's serving revision; False if it already was."""
        ...

    async def delete_function(self, name: str) -> bool: ...

    async def write_telemetry(
        self, activations: list[ActivationRecord], logs: list[LogRecord]
    ) -> None: ...

    async def activations(self, name: str, limit: int) -> list[ActivationRecord]: ...

    async def logs(self, name: str, since: float, after_id: int, limit: int) -> list[LogRecord]: ...

    async def prune(self, keep_activations: int, keep_logs: int) -> None: ...
