"""The OpenAPI 3.1 document of the server, generated from the msgspec types of `schemas`.

One `Op` per route of `app.build()`: its parameters, request body, success and error responses.
Every `/api/v1` operation needs `Authorization: Bearer <key>` (the `bearerAuth` scheme);
`/healthz` and `/metrics` need none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import msgspec

from ember.api import schemas as s
from ember.api.triggers import HookAccepted, TriggerList, TriggerRequest
from ember.queue.base import STATUSES
from ember.queue.views import InvocationInfo, InvocationList
from ember.secretbox import MAX_SECRET_BYTES
from ember.spec import Quota
from ember.triggers.manager import View as TriggerView

NAME_PATTERN = "^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$"  # manifest.NAME_RE: functions, namespaces
SECRET_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"  # manifest.SECRET_NAME_RE
KEY_ID_PATTERN = "^[0-9a-f]{8}$"  # auth: ember_<id>_<secret>
SCOPE_PATTERN = "^(admin|(deploy|invoke|read):([*]|[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?))$"  # auth
INT64_MAX = 2**63 - 1  # the largest integer the store keeps (app._body rejects larger ones)

_COUNT = {"minimum": 0, "maximum": INT64_MAX}
# What the server checks beyond the types of the structs: (struct, field) -> JSON schema keywords.
REFINEMENTS: dict[tuple[str, str], dict[str, Any]] = {
    ("Quota", "functions"): _COUNT,
    ("Quota", "instances"): _COUNT,
    ("Quota", "memory_mb"): _COUNT,
    ("ScaleRequest", "instances"): _COUNT,
    ("RollbackRequest", "to"): _COUNT,
    ("Alias", "name"): {"pattern": NAME_PATTERN, "not": {"const": "latest"}},  # latest: reserved
    ("Alias", "revision"): {"minimum": 1, "maximum": INT64_MAX},
    ("Alias", "weight"): {"minimum": 0, "maximum": 100},
    ("KeyRequest", "scopes"): {
        "minItems": 1,
        "items": {"type": "string", "pattern": SCOPE_PATTERN},
    },
    ("KeyRequest", "rate"): {"anyOf": [{"const": 0}, {"minimum": 0.001, "maximum": 1_000_000}]},
    ("KeyRequest", "burst"): {"minimum": 0, "maximum": 1_000_000},
    ("TriggerRequest", "trigger"): {
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "minLength": 1},
            "name": {"type": "string", "pattern": NAME_PATTERN},
        },
    },
}

_ROLLOUT_PARAMS: list[tuple[str, dict[str, Any], str]] = [
    (
        "canary",
        {"type": "integer", "minimum": 1, "maximum": 99},
        "Start a gradual rollout: the new revision gets this % of the traffic",
    ),
    ("step", {"type": "integer", "minimum": 1, "maximum": 100}, "Rollout: % added per step (10)"),
    ("every", {"type": "number", "minimum": 1, "maximum": 86400}, "Rollout: seconds per step (60)"),
    (
        "max_error_rate",
        {"type": "number", "minimum": 0, "maximum": 1},
        "Rollout: the canary's 5xx share that rolls back (0.01)",
    ),
    (
        "max_p99_ms",
        {"type": "number", "minimum": 0, "maximum": 3600000},
        "Rollout: the canary's p99 latency that rolls back (0: not checked)",
    ),
]

ERRORS = {
    400: "Bad request: an invalid parameter, name or body",
    401: "No API key, or one that is unknown, revoked or malformed",
    403: "The key lacks the scope this call needs (or a namespace quota would be exceeded)",
    404: "No such function, secret or key",
    409: "A conflict: a namespace against a function of namespace default, a secret in use, "
    "an invocation not in the state the call needs",
    413: "The body is too large",
    415: "A JSON body sent as another Content-Type",
    422: "The deploy was rejected: the code failed to import, a listed secret is missing, or a "
    "trigger's settings are wrong or its broker unreachable",
    429: "The key is over its rate limit, or the namespace over its instance quota",
    503: "The event could be neither delivered nor queued: send it again later",
}

_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "Bearer",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {
            "description": "Seconds until a retry may succeed",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}


def _param(
    name: str, where: str, schema: dict[str, Any], description: str, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "description": description,
        "schema": schema,
    }


NAMESPACE = _param(
    "namespace",
    "query",
    {"type": "string", "pattern": NAME_PATTERN, "default": "default"},
    "The namespace (tenant) the call applies to",
)
FUNCTION = _param("name", "path", {"type": "string", "pattern": NAME_PATTERN}, "Function name")
SECRET = _param("name", "path", {"type": "string", "pattern": SECRET_PATTERN}, "Secret name")
TRIGGER = _param("trigger", "path", {"type": "string", "pattern": NAME_PATTERN}, "Trigger name")
HOOK = _param("trigger_id", "path", {"type": "string"}, "A webhook trigger's id")
INVOCATION = _param("id", "path", {"type": "string"}, "Async invocation id (X-Call-Id)")


def _limit(default: int, maximum: int) -> dict[str, Any]:
    return _param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": maximum, "default": default},
        "At most this many records",
    )


@dataclass(frozen=True, slots=True)
class Op:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    response: Any  # a msgspec type, or an inline JSON schema (dict)
    errors: tuple[int, ...] = ()
    params: tuple[dict[str, Any], ...] = ()
    body: Any = None  # a msgspec type, or (media type, JSON schema) of a raw body
    status: tuple[int, ...] = (200,)
    media: str = "application/json"
    auth: bool = True


_AUTH = (401, 429)  # every authenticated call: no/bad key, key over its rate
_READ = (400, 403, 404, *_AUTH)  # a function in a namespace the key may read

OPERATIONS: list[Op] = [
    Op(
        "get",
        "/healthz",
        "healthz",
        "Liveness: the server answers",
        "system",
        {
            "type": "object",
            "properties": {"status": {"type": "string"}, "time": {"type": "number"}},
            "required": ["status", "time"],
        },
        auth=False,
    ),
    Op(
        "get",
        "/metrics",
        "metrics",
        "Prometheus metrics",
        "system",
        {"type": "string"},
        media="text/plain",
        auth=False,
    ),
    Op(
        "get",
        "/api/v1/openapi.json",
        "openapi",
        "This document",
        "system",
        {"type": "object"},
        _AUTH,
    ),
    Op(
        "get",
        "/api/v1/doctor",
        "doctor",
        "Isolation and limits on this host",
        "system",
        s.CheckList,
        _AUTH,
    ),
    Op(
        "get",
        "/api/v1/layers",
        "listLayers",
        "Installed requirements (layers) on this node, with their size; needs an admin key",
        "system",
        s.LayerList,
        (403, *_AUTH),
    ),
    Op(
        "post",
        "/api/v1/deploy",
        "deploy",
        "Deploy a bundle (tar.gz body); needs deploy:NS",
        "functions",
        s.DeployResponse,
        (400, 403, 409, 413, 422, *_AUTH),
        (
            NAMESPACE,
            _param(
                "name",
                "query",
                {"type": "string"},
                "Function name for a bundle without ember.yaml (checked only then: `ember "
                "deploy` always sends its directory's name)",
            ),
            *(_param(key, "query", schema, text) for key, schema, text in _ROLLOUT_PARAMS),
        ),
        body=("application/gzip", {"type": "string", "contentMediaType": "application/gzip"}),
        status=(200, 201),
    ),
    Op(
        "get",
        "/api/v1/functions",
        "listFunctions",
        "List functions: of ?namespace=, else of every namespace the key may read",
        "functions",
        s.FunctionList,
        (400, 403, *_AUTH),
        (NAMESPACE,),
    ),
    Op(
        "get",
        "/api/v1/functions/{name}",
        "describeFunction",
        "Describe a function",
        "functions",
        s.FunctionDetail,
        _READ,
        (FUNCTION, NAMESPACE),
    ),
    Op(
        "delete",
        "/api/v1/functions/{name}",
        "deleteFunction",
        "Remove a function; needs deploy:NS",
        "functions",
        s.Deleted,
        _READ,
        (FUNCTION, NAMESPACE),
    ),
    Op(
        "get",
        "/api/v1/functions/{name}/revisions",
        "listRevisions",
        "List revisions",
        "functions",
        s.RevisionList,
        _READ,
        (FUNCTION, NAMESPACE),
    ),
    Op(
        "get",
        "/api/v1/functions/{name}/builds",
        "listBuilds",
        "How each kept revision's requirements were installed: lock digest, packages, size, "
        "time, log",
        "functions",
        s.BuildList,
        _READ,
        (FUNCTION, NAMESPACE),
    ),
    Op(
        "post",
        "/api/v1/functions/{name}/scale",
        "scaleFunction",
        "Set the number of instances now (up to scale.max); needs deploy:NS",
        "functions",
        s.ScaleResponse,
        _READ,
        (FUNCTION, NAMESPACE),
        body=s.ScaleRequest,
    ),
    Op(
        "put",
        "/api/v1/functions/{name}/traffic",
        "setTraffic",
        "Set the aliases and their weights (summing to 100, or all 0); ends a running "
        "rollout; needs deploy:NS",
        "traffic",
        s.Traffic,
        (422, *_READ),
        (FUNCTION, NAMESPACE),
        body=s.TrafficRequest,
    ),
    Op(
        "post",
        "/api/v1/functions/{name}/rollback",
        "rollback",
        "All traffic to one revision in one step (`to`, else the rollout's stable one, else "
        "the previous one); needs deploy:NS",
        "traffic",
        s.Traffic,
        (409, 422, *_READ),
        (FUNCTION, NAMESPACE),
        body=s.RollbackRequest,
    ),
    Op(
        "get",
        "/api/v1/functions/{name}/logs",
        "functionLogs",
        "Captured output, one LogLine JSON object per line",
        "functions",
        s.LogLine,
        _READ,
        (
            FUNCTION,
            NAMESPACE,
            _param("since", "query", {"type": "number"}, "Only lines from this unix time on"),
            _param(
                "follow",
                "query",
                {"type": "boolean", "default": False},
                "Keep the response open and stream new lines",
            ),
            _limit(1000, 100_000),
        ),
        media="application/x-ndjson",
    ),
    Op(
        "get",
        "/api/v1/functions/{name}/activations",
        "functionActivations",
        "Activation records, newest first",
        "functions",
        s.ActivationList,
        _READ,
        (FUNCTION, NAMESPACE, _limit(50, 10_000)),
    ),
    Op(
        "get",
        "/api/v1/functions/{name}/invocations",
        "functionInvocations",
        "The function's async invocations, newest first",
        "invocations",
        InvocationList,
        _READ,
        (
            FUNCTION,
            NAMESPACE,
            _param("status", "query", {"type": "string", "enum": list(STATUSES)}, "Only these"),
            _limit(50, 10_000),
        ),
    ),
    Op(
        "get",
        "/api/v1/functions/{name}/dlq",
        "deadLetters",
        "The function's dead async invocations (retries exhausted), newest first",
        "invocations",
        InvocationList,
        _READ,
        (FUNCTION, NAMESPACE, _limit(50, 10_000)),
    ),
    Op(
        "delete",
        "/api/v1/functions/{name}/dlq",
        "purgeDeadLetters",
        "Forget the function's dead async invocations; needs deploy:NS",
        "invocations",
        s.Purged,
        _READ,
        (FUNCTION, NAMESPACE),
    ),
    Op(
        "post",
        "/api/v1/functions/{name}/dlq/replay",
        "replayDeadLetters",
        "Queue dead async invocations again (these ids, or all); needs deploy:NS",
        "invocations",
        s.Replayed,
        (415, *_READ),
        (FUNCTION, NAMESPACE),
        body=s.ReplayRequest,
    ),
    Op(
        "get",
        "/api/v1/invocations/{id}",
        "getInvocation",
        "One async invocation: status, attempts, result; needs read:NS",
        "invocations",
        InvocationInfo,
        (404, *_AUTH),
        (INVOCATION,),
    ),
    Op(
        "delete",
        "/api/v1/invocations/{id}",
        "cancelInvocation",
        "Cancel an async invocation that has not started; needs invoke:NS",
        "invocations",
        InvocationInfo,
        (404, 409, *_AUTH),
        (INVOCATION,),
    ),
    Op(
        "post",
        "/api/v1/invocations/{id}/replay",
        "replayInvocation",
        "Queue a dead async invocation again; needs deploy:NS",
        "invocations",
        InvocationInfo,
        (404, 409, *_AUTH),
        (INVOCATION,),
    ),
    Op(
        "get",
        "/api/v1/namespaces",
        "listNamespaces",
        "Namespaces the key may read, with their quotas",
        "namespaces",
        s.NamespaceList,
        _AUTH,
    ),
    Op(
        "put",
        "/api/v1/namespaces/{namespace}/quota",
        "setQuota",
        "Set a namespace's quota (0 = unlimited), creating the namespace; needs admin",
        "namespaces",
        s.NamespaceInfo,
        (400, 403, 409, *_AUTH),
        (_param("namespace", "path", {"type": "string", "pattern": NAME_PATTERN}, "Namespace"),),
        body=Quota,
    ),
    Op(
        "get",
        "/api/v1/keys",
        "listKeys",
        "List API keys; needs admin",
        "keys",
        s.KeyList,
        (403, *_AUTH),
    ),
    Op(
        "post",
        "/api/v1/keys",
        "createKey",
        "Create an API key (the token is shown once); needs admin",
        "keys",
        s.NewKey,
        (400, 403, *_AUTH),
        body=s.KeyRequest,
        status=(201,),
    ),
    Op(
        "delete",
        "/api/v1/keys/{key_id}",
        "revokeKey",
        "Revoke an API key; needs admin",
        "keys",
        s.Deleted,
        (403, 404, *_AUTH),
        (_param("key_id", "path", {"type": "string", "pattern": KEY_ID_PATTERN}, "Key id"),),
    ),
    Op(
        "get",
        "/api/v1/secrets",
        "listSecrets",
        "Names of a namespace's secrets (values never leave the server); needs deploy:NS",
        "secrets",
        s.SecretList,
        (400, 403, *_AUTH),
        (NAMESPACE,),
    ),
    Op(
        "put",
        "/api/v1/secrets/{name}",
        "setSecret",
        "Set a secret; the body is its value; needs deploy:NS",
        "secrets",
        s.SecretSet,
        (400, 403, 409, 413, *_AUTH),
        (SECRET, NAMESPACE),
        body=(
            "application/octet-stream",
            {"type": "string", "minLength": 1, "maxLength": MAX_SECRET_BYTES},
        ),
        status=(200, 201),
    ),
    Op(
        "delete",
        "/api/v1/secrets/{name}",
        "deleteSecret",
        "Delete a secret no function lists; needs deploy:NS",
        "secrets",
        s.Deleted,
        (400, 403, 404, 409, *_AUTH),
        (SECRET, NAMESPACE),
    ),
]


OPERATIONS += [
    Op(
        "get",
        "/api/v1/triggers",
        "listTriggers",
        "Every trigger of the functions the key may read (or of one namespace), with its "
        "state and counts",
        "triggers",
        TriggerList,
        (400, 403, *_AUTH),
        (NAMESPACE,),
    ),
    Op(
        "get",
        "/api/v1/functions/{name}/triggers",
        "functionTriggers",
        "The function's triggers, with their state, counts and lag",
        "triggers",
        TriggerList,
        _READ,
        (FUNCTION, NAMESPACE),
    ),
    Op(
        "post",
        "/api/v1/functions/{name}/triggers",
        "addTrigger",
        "Add a trigger (kept across deploys); needs deploy:NS",
        "triggers",
        TriggerView,
        (409, 422, *_READ),
        (FUNCTION, NAMESPACE),
        body=TriggerRequest,
        status=(201,),
    ),
    Op(
        "delete",
        "/api/v1/functions/{name}/triggers/{trigger}",
        "removeTrigger",
        "Remove a trigger added with the API (ember.yaml ones go with a deploy); needs deploy:NS",
        "triggers",
        s.Deleted,
        (409, *_READ),
        (FUNCTION, TRIGGER, NAMESPACE),
    ),
    Op(
        "post",
        "/api/v1/functions/{name}/triggers/{trigger}/pause",
        "pauseTrigger",
        "Stop reading the trigger's source until resumed (kept across restarts); needs deploy:NS",
        "triggers",
        TriggerView,
        _READ,
        (FUNCTION, TRIGGER, NAMESPACE),
    ),
    Op(
        "post",
        "/api/v1/functions/{name}/triggers/{trigger}/resume",
        "resumeTrigger",
        "Read the trigger's source again; needs deploy:NS",
        "triggers",
        TriggerView,
        _READ,
        (FUNCTION, TRIGGER, NAMESPACE),
    ),
    Op(
        "post",
        "/hooks/{trigger_id}",
        "webhook",
        "An event for a webhook trigger, signed with its secret (HMAC-SHA256); answered once "
        "the function succeeded or the event is queued durably",
        "triggers",
        HookAccepted,
        (400, 401, 404, 409, 413, 503),
        (HOOK,),
        body=("application/octet-stream", {"type": "string"}),
        status=(202,),
        auth=False,
    ),
]


def _schema(kind: Any) -> dict[str, Any]:
    if isinstance(kind, dict):
        return kind
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def _operation(op: Op) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(code): {
            "description": "Created" if code == 201 else "OK",
            "content": {op.media: {"schema": _schema(op.response)}},
        }
        for code in op.status
    }
    errors = set(op.errors)
    if op.body is not None and not isinstance(op.body, tuple):
        errors.add(415)  # a JSON body: any other declared media type is refused
    for code in sorted(errors):
        responses[str(code)] = {
            "description": ERRORS[code],
            "content": {"application/json": {"schema": _schema(s.ErrorBody)}},
        }
        if code in _ERROR_HEADERS:
            responses[str(code)]["headers"] = _ERROR_HEADERS[code]
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "security": [{"bearerAuth": []}] if op.auth else [],
        "responses": responses,
    }
    if op.params:
        out["parameters"] = list(op.params)
    if isinstance(op.body, tuple):
        media, schema = op.body
        out["requestBody"] = {"required": True, "content": {media: {"schema": schema}}}
    elif op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema(op.body)}},
        }
    return out


@functools.cache
def _document() -> bytes:
    types = {t for op in OPERATIONS for t in (op.body, op.response) if isinstance(t, type)} | {
        s.ErrorBody
    }
    _, components = msgspec.json.schema_components(
        sorted(types, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}"
    )
    for (struct, field), keywords in REFINEMENTS.items():
        components[struct]["properties"][field].update(keywords)  # KeyError: a stale entry
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return msgspec.json.encode(
        {
            "openapi": "3.1.0",
            "info": {"title": "Ember control plane", "version": "1"},
            "paths": paths,
            "components": {
                "schemas": components,
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "An API key: ember_<8 hex>_<43 characters>",
                    }
                },
            },
        }
    )


def document() -> dict[str, Any]:
    """A fresh copy each call: callers may change it."""
    doc: dict[str, Any] = msgspec.json.decode(_document())
    return doc
