"""Request and response bodies of `/api/v1`; the OpenAPI document is generated from these."""

from __future__ import annotations

import msgspec

from ember.pool.capabilities import Check
from ember.spec import FunctionSpec, Quota
from ember.store.base import Alias, Rollout
from ember.telemetry.records import ActivationRecord


class InstanceCounts(msgspec.Struct, frozen=True):
    idle: int = 0
    busy: int = 0
    starting: int = 0
    waiting: int = 0


class AutoscalerInfo(msgspec.Struct, frozen=True):
    desired: int = 0  # instances the autoscaler asks for, over the function's live revisions
    panic: bool = False
    concurrency: float = 0.0  # mean requests in flight or waiting over the stable window
    keepalive: str = ""  # how the zygote keep-alive is decided (histogram or fixed)


class FunctionInfo(msgspec.Struct, frozen=True):
    name: str
    namespace: str
    revision: int
    sha256: str
    created_at: float
    updated_at: float
    spec: FunctionSpec
    instances: InstanceCounts
    zygote: bool
    url: str
    autoscaler: AutoscalerInfo = AutoscalerInfo()


class RevisionInfo(msgspec.Struct, frozen=True):
    number: int
    sha256: str
    created_at: float
    spec: FunctionSpec
    # what changed from the revision before it: "code", "memory: 128 -> 256", ...
    changes: list[str] = []
    serving: bool = False  # /fn/NAME reaches it without weights
    aliases: list[str] = []  # "stable 90%", "canary 10%", "latest"


class Traffic(msgspec.Struct, frozen=True):
    serving: int  # the revision /fn/NAME reaches when no weights are set
    previous: int  # where `ember rollback` goes without --to
    aliases: list[Alias] = []
    rollout: Rollout | None = None  # the latest rollout, whatever its state


class FunctionDetail(FunctionInfo, frozen=True):
    revisions: list[RevisionInfo] = []
    traffic: Traffic | None = None


class TrafficRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    aliases: list[Alias]


class RollbackRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    to: int = 0  # 0: the running rollout's stable revision, else the previous one


class CanaryPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`ember deploy --canary 10 --step 10 --every 1m --max-error-rate 1% --max-p99 500ms`."""

    percent: int
    step: int = 10
    every: float = 60.0  # seconds per step
    max_error_rate: float = 0.01  # of the canary's requests (5xx), 0-1
    max_p99_ms: float = 0.0  # 0: not checked


class FunctionList(msgspec.Struct, frozen=True):
    functions: list[FunctionInfo]


class RevisionList(msgspec.Struct, frozen=True):
    revisions: list[RevisionInfo]


class LayerInfo(msgspec.Struct, frozen=True):
    """The installed requirements a revision runs with."""

    digest: str  # of the lock (exact versions and hashes) and the platform
    packages: list[str]  # "name==version"
    built: bool  # this deploy installed it; False: it was there (the same lock elsewhere)
    build_ms: float  # resolving (or reusing the lock) and installing, this deploy


class BuildInfo(msgspec.Struct, frozen=True):
    """How one revision's requirements were installed."""

    revision: int
    layer: str  # the lock's digest
    packages: list[str]
    bytes: int
    build_ms: float  # resolving (or reusing the lock) and installing, at that deploy
    built: bool  # that deploy installed the layer; False: it was installed already
    log: str  # what the resolver and installer said
    created_at: float


class BuildList(msgspec.Struct, frozen=True):
    builds: list[BuildInfo]  # newest first; revisions without requirements have none


class InstalledLayer(msgspec.Struct, frozen=True):
    """One layer on this node's disk."""

    digest: str
    packages: list[str]
    bytes: int
    build_ms: float
    created_at: float
    revisions: int  # stored revisions that run with it (0: removed at the next clean-up)


class LayerZygoteInfo(msgspec.Struct, frozen=True):
    """A layer zygote running on this node (ember.pool.layer_zygotes)."""

    namespace: str
    function: str
    layer: str  # the layer's digest
    preload: list[str]  # what it imported once
    import_ms: float | None  # None: still importing
    forks: int  # function zygotes forked from it
    running: int  # of those, alive now
    memory_kb: int  # measured (PSS); 0: not yet


class LayerList(msgspec.Struct, frozen=True):
    layers: list[InstalledLayer]
    count: int
    bytes: int  # on disk, all layers together
    zygotes: list[LayerZygoteInfo] = []


class Deployed(msgspec.Struct, frozen=True):
    name: str
    revision: int
    created: bool
    sha256: str
    url: str
    import_ms: float | None = None
    warnings: list[str] = []
    namespace: str = "default"
    layer: LayerInfo | None = None


class DeployResponse(msgspec.Struct, frozen=True):
    functions: list[Deployed]


class DeployProgress(msgspec.Struct, frozen=True, omit_defaults=True, tag_field="event"):
    """A step of a deploy as it happens (`Accept: application/x-ndjson`, one JSON per line):
    resolving, resolved, installing, installed (a function's requirements; building and built
    when they are built from source in the namespace's sandbox), importing (its code, in a new
    zygote)."""

    function: str
    phase: str
    packages: list[str] = []  # resolved: the lock's "name==version"
    reused: bool = False  # resolved: an earlier deploy's lock; installed: the layer was there
    bytes: int = 0  # installed: the layer's size
    ms: float = 0.0  # how long the step took


class DeployDone(msgspec.Struct, frozen=True, tag_field="event"):
    """The last line of a streamed deploy that succeeded: what a plain deploy answers."""

    status: int  # 201: a revision was created; 200: nothing changed
    result: DeployResponse


class DeployFailed(msgspec.Struct, frozen=True, tag_field="event"):
    """The last line of a streamed deploy that was refused: what a plain deploy answers."""

    status: int  # the HTTP status a plain deploy would have had
    error: ErrorDetail


class ScaleRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    instances: int


class ScaleResponse(msgspec.Struct, frozen=True):
    name: str
    instances: int


class Deleted(msgspec.Struct, frozen=True):
    deleted: str


class ActivationList(msgspec.Struct, frozen=True):
    activations: list[ActivationRecord]


class LogLine(msgspec.Struct, frozen=True):
    id: int
    ts: float
    function: str
    revision: int
    request_id: str
    instance: str
    stream: str
    message: str


class CheckList(msgspec.Struct, frozen=True):
    checks: list[Check]


class ErrorDetail(msgspec.Struct, frozen=True):
    code: str
    message: str
    detail: str | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


class NamespaceInfo(msgspec.Struct, frozen=True):
    name: str
    quota: Quota
    uid: int  # its functions' uid and gid inside the sandbox


class NamespaceList(msgspec.Struct, frozen=True):
    namespaces: list[NamespaceInfo]


class KeyRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    scopes: list[str]
    name: str = ""
    rate: float = 0.0  # requests per second, 0 = unlimited
    burst: int = 0  # bucket size; 0 = rate rounded up


class NewKey(msgspec.Struct, frozen=True):
    id: str
    key: str  # shown once; only its digest is stored
    scopes: list[str]


class KeyInfo(msgspec.Struct, frozen=True):
    id: str
    name: str
    scopes: list[str]
    rate: float
    burst: int
    created_at: float
    revoked_at: float | None = None


class KeyList(msgspec.Struct, frozen=True):
    keys: list[KeyInfo]


class SecretList(msgspec.Struct, frozen=True):
    namespace: str
    names: list[str]  # values never leave the server


class SecretSet(msgspec.Struct, frozen=True):
    namespace: str
    name: str


class ReplayRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Dead invocations to queue again: all of the function's (`all`, whatever `ids` lists),
    or these ids (none: nothing)."""

    ids: list[str] = []
    all: bool = False


class Replayed(msgspec.Struct, frozen=True):
    replayed: list[str]


class Purged(msgspec.Struct, frozen=True):
    purged: int
