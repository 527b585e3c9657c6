"""The `Blobs` protocol: bytes in, sha256 out; same bytes, same name."""

from __future__ import annotations

from typing import Protocol


class Blobs(Protocol):
    def put(self, data: bytes) -> str: ...

    def get(self, digest: str) -> bytes: ...

    def has(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> bool: ...

    def all(self) -> list[str]: ...
