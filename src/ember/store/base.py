"""The `Store` protocol and the records it keeps."""

from __future__ import annotations

from typing import Protocol

import msgspec

from ember.spec import FunctionSpec, Quota
from ember.telemetry.records import ActivationRecord, LogRecord
from ember.triggers.records import TriggerRecord


class Alias(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A named pointer at a revision, reachable at /fn/NAME@ALIAS; `weight` is its share (%)
    of the traffic to /fn/NAME when the function's weights are set (they sum to 100)."""

    name: str
    revision: int
    weight: int = 0


class Rollout(msgspec.Struct, frozen=True):
    """A gradual rollout: the canary's share grows by `step` every `every` seconds while its
    error rate and p99 stay within bounds; otherwise traffic goes back to `from_revision`."""

    from_revision: int
    to_revision: int
    weight: int  # the canary's share now, %
    step: int
    every: float  # seconds
    max_error_rate: float  # 0-1, of the canary's requests in a step (5xx)
    max_p99_ms: float  # 0: not checked
    state: str = "running"  # running | done | rolled_back | superseded
    reason: str = ""
    started_at: float = 0.0
    updated_at: float = 0.0
    next_at: float = 0.0  # wall clock of the next step
    requests: int = 0  # the canary's, over the whole rollout
    errors: int = 0


def effective_revision(revision: int, aliases: list[Alias]) -> int:
    """The revision that serves most of /fn/NAME: the heaviest alias while weights are set,
    else the serving pointer. What `ember rollback` later goes back to."""
    weighted = [a for a in aliases if a.weight]
    if not weighted or sum(a.weight for a in weighted) != 100:
        return revision
    top = max(a.weight for a in weighted)
    heaviest = [a.revision for a in weighted if a.weight == top]
    return revision if revision in heaviest else heaviest[0]  # a tie keeps the pointer


class FunctionRecord(msgspec.Struct, frozen=True):
    name: str  # "namespace/name": the key of a function
    revision: int  # the revision that serves (all of /fn/NAME when no weights are set)
    created_at: float
    updated_at: float
    previous: int = 0  # the one that served before: `ember rollback` goes back to it
    aliases: list[Alias] = []
    rollout: Rollout | None = None  # the latest one, whatever its state


class RevisionRecord(msgspec.Struct, frozen=True):
    function: str  # "namespace/name"
    number: int
    sha256: str  # of the code tree and the canonical config
    bundle: str  # sha256 of the stored bundle blob
    spec: FunctionSpec
    created_at: float
    tree: str = ""  # sha256 of the code tree alone (config changes keep it); "" before v3
    layer: str = ""  # digest of its requirements' layer (ember.layers); "": none


class BuildRecord(msgspec.Struct, frozen=True):
    """How a revision's requirements came to be installed (`ember builds`)."""

    function: str
    revision: int  # 0 until the store numbers the revision it belongs to
    layer: str
    packages: list[str]
    bytes: int
    build_ms: float  # resolving (or reusing the lock) and installing, at that deploy
    built: bool  # that deploy installed the layer; False: it was there
    log: str  # what the resolver and the installer said
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

    async def function_and_revisions(
        self, name: str
    ) -> tuple[FunctionRecord | None, list[RevisionRecord]]: ...

    async def add_revision(
        self,
        key: str,
        spec: FunctionSpec,
        sha256: str,
        bundle: str,
        now: float,
        tree: str = "",
        serve: bool = True,
        layer: str = "",
        build: BuildRecord | None = None,
    ) -> tuple[RevisionRecord, bool]:
        """Add `sha256` as function `key`'s next revision and, with `serve`, make it the
        serving one (weights cleared, the old one kept as `previous`); False if it already
        served."""
        ...

    async def set_traffic(
        self,
        key: str,
        revision: int,
        previous: int,
        aliases: list[Alias],
        rollout: Rollout | None,
        now: float,
    ) -> None:
        """Move the serving pointer, the aliases and the rollout in one transaction."""
        ...

    async def delete_revisions(self, key: str, numbers: list[int]) -> None: ...

    async def bundles_in_use(self) -> set[str]: ...

    async def builds(self, key: str) -> list[BuildRecord]:
        """The builds of function `key`'s stored revisions, newest first."""
        ...

    async def layer_revisions(self) -> dict[str, int]:
        """Per layer digest that some stored revision runs with: how many do."""
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

    async def triggers(self) -> list[TriggerRecord]: ...

    async def put_trigger(self, rec: TriggerRecord) -> None:
        """Insert, or replace the one with its function and name."""

    async def delete_trigger(self, function: str, name: str) -> bool: ...

    async def trigger_state(self, id: str) -> bytes: ...

    async def set_trigger_state(self, id: str, state: bytes) -> None: ...
