"""Request and response bodies of `/api/v1`; the OpenAPI document is generated from these."""

from __future__ import annotations

import msgspec

from ember.pool.capabilities import Check
from ember.spec import FunctionSpec
from ember.telemetry.records import ActivationRecord


class InstanceCounts(msgspec.Struct, frozen=True):
    idle: int = 0
    busy: int = 0
    starting: int = 0
    waiting: int = 0


class FunctionInfo(msgspec.Struct, frozen=True):
    name: str
    revision: int
    sha256: str
    created_at: float
    updated_at: float
    spec: FunctionSpec
    instances: InstanceCounts
    zygote: bool
    url: str


class RevisionInfo(msgspec.Struct, frozen=True):
    number: int
    sha256: str
    created_at: float
    spec: FunctionSpec


class FunctionDetail(FunctionInfo, frozen=True):
    revisions: list[RevisionInfo] = []


class FunctionList(msgspec.Struct, frozen=True):
    functions: list[FunctionInfo]


class RevisionList(msgspec.Struct, frozen=True):
    revisions: list[RevisionInfo]


class Deployed(msgspec.Struct, frozen=True):
    name: str
    revision: int
    created: bool
    sha256: str
    url: str
    import_ms: float | None = None
    warnings: list[str] = []


class DeployResponse(msgspec.Struct, frozen=True):
    functions: list[Deployed]


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
