"""Starlette routes of `/api/v1`: thin handlers over `Control`, errors as JSON."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match, Route

from ember import auth
from ember.api import schemas as s
from ember.api.control import DEFAULT_NS, Control, validate_namespace
from ember.api.openapi import INT64_MAX, document
from ember.api.revisions import revision_changes
from ember.auth import Principal
from ember.errors import EmberError, Forbidden, UserError
from ember.pool.target import Target
from ember.secretbox import MAX_SECRET_BYTES
from ember.spec import Quota
from ember.store.base import FunctionRecord, RevisionRecord
from ember.telemetry.metrics import Metrics

log = logging.getLogger("ember.api")
_json = msgspec.json.Encoder()


def _ok(body: object, status: int = 200) -> Response:
    return Response(_json.encode(body), status, media_type="application/json")


def _error(exc: EmberError) -> Response:
    return Response(
        _json.encode(exc.to_json()), exc.status, headers=exc.headers, media_type="application/json"
    )


class Api:
    """Every handler first authenticates: a key, its scope for the namespace, its rate."""

    def __init__(self, control: Control, metrics: Metrics) -> None:
        self.control = control
        self.metrics = metrics

    def _who(self, request: Request) -> Principal:
        principal = self.control.keys.verify(request.headers.get("authorization"))
        self.control.keys.throttle(principal, time.monotonic())
        return principal

    def _allow(self, request: Request, action: str) -> tuple[Principal, str]:
        """The caller, if it may `action` in the request's namespace (?namespace=, default)."""
        principal = self._who(request)
        namespace = validate_namespace(request.query_params.get("namespace", DEFAULT_NS))
        self.control.keys.require(principal, action, namespace)
        return principal, namespace

    def _admin(self, request: Request) -> None:
        principal = self._who(request)
        if not principal.admin:
            raise Forbidden(f"key {principal.key.id} is not an admin key; this call needs one")

    def info(self, target: Target) -> s.FunctionInfo:
        counts = s.InstanceCounts()
        zygote = False
        desired, panic, concurrency = 0, False, 0.0
        for st in self.control.pool.statistics():
            if st.function == target.qualified:
                counts = s.InstanceCounts(
                    idle=counts.idle + st.idle,
                    busy=counts.busy + st.busy,
                    starting=counts.starting + st.starting,
                    waiting=counts.waiting + st.waiting,
                )
                zygote = zygote or (st.zygote == "ready" and st.revision == target.number)
                if not st.retired:
                    desired += st.desired
                    panic = panic or st.panic
                    concurrency += st.concurrency
        windows = self.control.pool.keepalive_windows(target.qualified)
        return s.FunctionInfo(
            name=target.function,
            namespace=target.namespace,
            revision=target.number,
            sha256=target.sha256,
            created_at=0.0,
            updated_at=0.0,
            spec=target.spec,
            instances=counts,
            zygote=zygote,
            url=self.control.url(target.namespace, target.function),
            autoscaler=s.AutoscalerInfo(
                desired=desired,
                panic=panic,
                concurrency=round(concurrency, 3),
                keepalive=f"pre-warm {windows.prewarm:g} s, keep {windows.keepalive:g} s "
                f"({windows.reason})",
            ),
        )

    async def functions(self, request: Request) -> Response:
        if "namespace" in request.query_params:
            _, namespace = self._allow(request, "read")
            visible: set[str] | None = {namespace}
        else:  # every namespace the key may read
            visible = self._who(request).namespaces("read")
        records = {rec.name: rec for rec in await self.control.store.functions()}
        out = []
        for target in self.control.functions_in(visible):
            info = self.info(target)
            rec = records.get(target.qualified)
            if rec is not None:
                info = msgspec.structs.replace(
                    info, created_at=rec.created_at, updated_at=rec.updated_at
                )
            out.append(info)
        return _ok(s.FunctionList(functions=out))

    def _target(self, request: Request, action: str) -> Target:
        _, namespace = self._allow(request, action)
        return self.control.require(namespace, request.path_params["name"])

    async def function(self, request: Request) -> Response:
        target = self._target(request, "read")
        info = self.info(target)
        rec = await self.control.store.function(target.qualified)
        revs = await self._revisions(target)
        fields = msgspec.structs.asdict(info)
        traffic = None
        if rec is not None:
            fields.update(created_at=rec.created_at, updated_at=rec.updated_at)
            traffic = _traffic(rec)
        return _ok(s.FunctionDetail(**fields, revisions=revs, traffic=traffic))

    async def _revisions(self, target: Target) -> list[s.RevisionInfo]:
        """Every kept revision, with what changed from the one before and what points at it."""
        fn = await self.control.store.function(target.qualified)
        records = await self.control.store.revisions(target.qualified)
        latest = records[-1].number if records else 0
        out = []
        before: RevisionRecord | None = None
        for r in records:
            names = []
            if fn is not None:
                names = [
                    f"{a.name} {a.weight}%" if a.weight else a.name
                    for a in fn.aliases
                    if a.revision == r.number
                ]
            if r.number == latest:
                names.append("latest")
            out.append(
                s.RevisionInfo(
                    number=r.number,
                    sha256=r.sha256,
                    created_at=r.created_at,
                    spec=r.spec,
                    changes=revision_changes(before, r),
                    serving=fn is not None and fn.revision == r.number,
                    aliases=names,
                )
            )
            before = r
        return out

    async def delete(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        name = request.path_params["name"]
        await self.control.delete(namespace, name)
        return _ok(s.Deleted(deleted=name))

    async def revisions(self, request: Request) -> Response:
        target = self._target(request, "read")
        return _ok(s.RevisionList(revisions=await self._revisions(target)))

    async def traffic(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        body = await _body(request, s.TrafficRequest)
        fn = await self.control.set_traffic(namespace, request.path_params["name"], body.aliases)
        return _ok(_traffic(fn))

    async def rollback(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        body = await _body(request, s.RollbackRequest)
        fn = await self.control.rollback(namespace, request.path_params["name"], body.to)
        return _ok(_traffic(fn))

    async def deploy(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        name = request.query_params.get("name", "")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.control.config.max_bundle_bytes:
                break
        if not data:
            raise UserError(
                "the deploy request has no body; send a tar.gz bundle "
                "(`ember deploy DIR` does it for you)",
                code="bad_bundle",
            )
        deployed = await self.control.deploy(
            bytes(data), name or "function", namespace, _canary(request)
        )
        return _ok(
            s.DeployResponse(functions=deployed), 201 if any(d.created for d in deployed) else 200
        )

    async def scale(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        name = request.path_params["name"]
        body = await _body(request, s.ScaleRequest)
        count = await self.control.scale(namespace, name, body.instances)
        return _ok(s.ScaleResponse(name=name, instances=count))

    async def activations(self, request: Request) -> Response:
        target = self._target(request, "read")
        limit = _int(request, "limit", 50, 1, 10_000)
        rows = await self.control.store.activations(target.qualified, limit)
        return _ok(s.ActivationList(activations=rows))

    async def logs(self, request: Request) -> Response:
        target = self._target(request, "read")
        since = _float(request, "since", 0.0)
        limit = _int(request, "limit", 1000, 1, 100_000)
        follow = _bool(request, "follow", False)
        key_id = self._who_id(request)
        return StreamingResponse(
            self._tail(target.qualified, since, limit, follow, key_id),
            media_type="application/x-ndjson",
        )

    def _who_id(self, request: Request) -> str:
        parsed = auth.parse_token(request.headers.get("authorization", "").partition(" ")[2])
        return parsed[0] if parsed else ""

    async def _tail(
        self, name: str, since: float, limit: int, follow: bool, key_id: str
    ) -> AsyncIterator[bytes]:
        after = 0
        store = self.control.store
        while True:
            if not self.control.keys.active(key_id):  # revoked while following
                return
            rows = await store.logs(name, since, after, limit)
            if rows:
                after = rows[-1].id
                yield b"".join(_json.encode(msgspec.structs.asdict(r)) + b"\n" for r in rows)
            if not follow:
                return
            if len(rows) < limit:
                try:
                    await asyncio.wait_for(
                        self.control.stopping.wait(), self.control.config.flush_interval
                    )
                    return
                except TimeoutError:
                    pass

    # ---- namespaces, keys, secrets ----
    async def namespaces(self, request: Request) -> Response:
        visible = self._who(request).namespaces("read")
        out = [
            s.NamespaceInfo(name=ns.name, quota=ns.quota, uid=self.control.uid(ns))
            for name, ns in sorted(self.control.namespaces.items())
            if visible is None or name in visible
        ]
        return _ok(s.NamespaceList(namespaces=out))

    async def set_quota(self, request: Request) -> Response:
        self._admin(request)
        namespace = request.path_params["namespace"]
        quota = await _body(request, Quota)
        ns = await self.control.set_quota(namespace, quota)
        return _ok(s.NamespaceInfo(name=ns.name, quota=ns.quota, uid=self.control.uid(ns)))

    async def keys(self, request: Request) -> Response:
        self._admin(request)
        rows = await self.control.store.keys()
        return _ok(
            s.KeyList(
                keys=[
                    s.KeyInfo(
                        id=k.id,
                        name=k.name,
                        scopes=k.scopes,
                        rate=k.rate,
                        burst=k.burst,
                        created_at=k.created_at,
                        revoked_at=k.revoked_at,
                    )
                    for k in rows
                ]
            )
        )

    async def create_key(self, request: Request) -> Response:
        self._admin(request)
        body = await _body(request, s.KeyRequest)
        token = await self.control.create_key(body.name, body.scopes, body.rate, body.burst)
        key_id = token.split("_")[1]
        return _ok(s.NewKey(id=key_id, key=token, scopes=sorted(set(body.scopes))), 201)

    async def revoke_key(self, request: Request) -> Response:
        self._admin(request)
        key_id = request.path_params["key_id"]
        await self.control.revoke_key(key_id)
        return _ok(s.Deleted(deleted=key_id))

    async def secrets(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        return _ok(s.SecretList(namespace=namespace, names=self.control.secret_names(namespace)))

    async def set_secret(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        name = request.path_params["name"]
        value = bytearray()
        async for chunk in request.stream():
            value += chunk
            if len(value) > MAX_SECRET_BYTES:
                break
        if not value:
            raise UserError(
                f"secret '{name[:64]}' has no value: send it as the request body (`ember "
                "secrets set NAME` reads it from standard input or --file)",
                code="bad_request",
            )
        created = await self.control.set_secret(namespace, name, bytes(value))
        return _ok(s.SecretSet(namespace=namespace, name=name), 201 if created else 200)

    async def delete_secret(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        name = request.path_params["name"]
        await self.control.delete_secret(namespace, name)
        return _ok(s.Deleted(deleted=name))

    async def doctor(self, request: Request) -> Response:
        self._who(request)  # what this server's functions get, as probed at its start
        return _ok(s.CheckList(checks=self.control.pool.protections))

    async def openapi(self, request: Request) -> Response:
        self._who(request)
        return _ok(document())

    async def healthz(self, request: Request) -> Response:
        return _ok({"status": "ok", "time": time.time()})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


async def _body(request: Request, kind: type[Any]) -> Any:
    media = request.headers.get("content-type")
    if media is not None and media.partition(";")[0].strip().lower() != "application/json":
        raise UserError(
            f"the body is JSON; send it as Content-Type: application/json, not {media[:60]!r}",
            code="unsupported_media_type",
            status=415,
        )
    raw = await request.body()
    try:
        body = msgspec.convert(_whole_numbers(msgspec.json.decode(raw), "$"), type=kind)
    except msgspec.ValidationError as exc:
        raise UserError(f"invalid request body: {exc}", code="bad_request") from None
    except msgspec.DecodeError as exc:
        raise UserError(f"request body is not valid JSON: {exc}", code="bad_request") from None
    return body


def _whole_numbers(value: Any, where: str) -> Any:
    """JSON has one number type, so `3.0` is the integer 3 (as JSON Schema, and so the OpenAPI
    document, has it); msgspec's integers refuse it. Integers beyond SQLite's INTEGER are
    refused here: every integer field of a request is documented within them."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is int and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise UserError(
            f"invalid request body: {where}={value} is out of range (at most {INT64_MAX})",
            code="bad_request",
        )
    if isinstance(value, list):
        return [_whole_numbers(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {key: _whole_numbers(item, f"{where}.{key}") for key, item in value.items()}
    return value


def _traffic(fn: FunctionRecord) -> s.Traffic:
    return s.Traffic(
        serving=fn.revision, previous=fn.previous, aliases=fn.aliases, rollout=fn.rollout
    )


def _canary(request: Request) -> s.CanaryPlan | None:
    """`?canary=10&step=10&every=60&max_error_rate=0.01&max_p99_ms=500` of a deploy."""
    if "canary" not in request.query_params:
        return None
    return s.CanaryPlan(
        percent=_int(request, "canary", 10, 1, 99),
        step=_int(request, "step", 10, 1, 100),
        every=_number(request, "every", 60.0, 1.0, 86_400.0),
        max_error_rate=_number(request, "max_error_rate", 0.01, 0.0, 1.0),
        max_p99_ms=_number(request, "max_p99_ms", 0.0, 0.0, 3_600_000.0),
    )


JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")


def _number(
    request: Request, key: str, default: float, low: float, high: float, what: str = ""
) -> float:
    """A query parameter documented as a number: JSON's syntax (Python's `float()` would also
    take `1_0`, ` 1`, `nan` or `infinity`), within [low, high]."""
    raw = request.query_params.get(key)
    if raw is None:
        return default
    value = float(raw) if JSON_NUMBER.match(raw) else math.nan
    if not low <= value <= high:  # NaN and infinities fail too
        rule = what or f"a number {low:g}-{high:g}"
        raise UserError(f"query parameter {key}={raw[:40]!r} must be {rule}")
    return value


def _int(request: Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) < 20) or not low <= int(raw) <= high:
        raise UserError(f"query parameter {key}={raw[:40]!r} must be a whole number {low}-{high}")
    return int(raw)


def _bool(request: Request, key: str, default: bool) -> bool:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    if raw not in ("true", "false"):
        raise UserError(f"query parameter {key}={raw[:40]!r} must be true or false")
    return raw == "true"


def _float(request: Request, key: str, default: float) -> float:
    return _number(
        request, key, default, -sys.float_info.max, sys.float_info.max, "a unix timestamp"
    )


def build(control: Control, metrics: Metrics) -> Starlette:
    api = Api(control, metrics)
    routes = [
        Route("/healthz", api.healthz),
        Route("/metrics", api.metrics_endpoint),
        Route("/api/v1/openapi.json", api.openapi),
        Route("/api/v1/doctor", api.doctor),
        Route("/api/v1/deploy", api.deploy, methods=["POST"]),
        Route("/api/v1/functions", api.functions),
        Route("/api/v1/functions/{name}", api.function),
        Route("/api/v1/functions/{name}", api.delete, methods=["DELETE"]),
        Route("/api/v1/functions/{name}/revisions", api.revisions),
        Route("/api/v1/functions/{name}/scale", api.scale, methods=["POST"]),
        Route("/api/v1/functions/{name}/traffic", api.traffic, methods=["PUT"]),
        Route("/api/v1/functions/{name}/rollback", api.rollback, methods=["POST"]),
        Route("/api/v1/functions/{name}/logs", api.logs),
        Route("/api/v1/functions/{name}/activations", api.activations),
        Route("/api/v1/namespaces", api.namespaces),
        Route("/api/v1/namespaces/{namespace}/quota", api.set_quota, methods=["PUT"]),
        Route("/api/v1/keys", api.keys),
        Route("/api/v1/keys", api.create_key, methods=["POST"]),
        Route("/api/v1/keys/{key_id}", api.revoke_key, methods=["DELETE"]),
        Route("/api/v1/secrets", api.secrets),
        Route("/api/v1/secrets/{name}", api.set_secret, methods=["PUT"]),
        Route("/api/v1/secrets/{name}", api.delete_secret, methods=["DELETE"]),
    ]

    async def ember_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EmberError)
        return _error(exc)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(EmberError(f"internal error: {type(exc).__name__}: {exc}"))

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        headers = {}
        if code == 405:  # the methods of every route of the path, not only of the first one
            allowed = {
                method
                for route in routes
                if route.matches(request.scope)[0] is Match.PARTIAL
                for method in route.methods or ()
            }
            headers["Allow"] = ", ".join(sorted(allowed))
        return Response(
            _json.encode(
                {
                    "error": {
                        "code": "not_found" if code == 404 else "method_not_allowed",
                        "message": f"{request.method} {request.url.path} is not an Ember endpoint; "
                        "see /api/v1/openapi.json",
                    }
                }
            ),
            code,
            headers=headers,
            media_type="application/json",
        )

    return Starlette(
        routes=routes,
        exception_handlers={
            EmberError: ember_error,
            Exception: unexpected,
            404: not_found,
            405: not_found,
        },
    )
