"""Starlette routes of `/api/v1`: thin handlers over `Control`, errors as JSON."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ember.api import schemas as s
from ember.api.control import Control
from ember.api.openapi import document
from ember.errors import EmberError, UserError
from ember.pool.capabilities import detect
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
    def __init__(self, control: Control, metrics: Metrics) -> None:
        self.control = control
        self.metrics = metrics

    def info(self, name: str, detail: bool = False) -> s.FunctionInfo:
        target = self.control.require(name)
        counts = s.InstanceCounts()
        zygote = False
        for st in self.control.pool.statistics():
            if st.function == name:
                counts = s.InstanceCounts(
                    idle=counts.idle + st.idle,
                    busy=counts.busy + st.busy,
                    starting=counts.starting + st.starting,
                    waiting=counts.waiting + st.waiting,
                )
                zygote = zygote or (st.zygote == "ready" and st.revision == target.number)
        return s.FunctionInfo(
            name=name,
            revision=target.number,
            sha256=target.sha256,
            created_at=0.0,
            updated_at=0.0,
            spec=target.spec,
            instances=counts,
            zygote=zygote,
            url=self.control.url(name),
        )

    async def functions(self, request: Request) -> Response:
        out = []
        for rec in await self.control.store.functions():
            if rec.name in self.control.routes.all():
                info = self.info(rec.name)
                out.append(
                    msgspec.structs.replace(
                        info, created_at=rec.created_at, updated_at=rec.updated_at
                    )
                )
        return _ok(s.FunctionList(functions=out))

    async def function(self, request: Request) -> Response:
        name = request.path_params["name"]
        info = self.info(name)
        rec = await self.control.store.function(name)
        revs = [
            s.RevisionInfo(number=r.number, sha256=r.sha256, created_at=r.created_at, spec=r.spec)
            for r in await self.control.store.revisions(name)
        ]
        fields = msgspec.structs.asdict(info)
        if rec is not None:
            fields.update(created_at=rec.created_at, updated_at=rec.updated_at)
        return _ok(s.FunctionDetail(**fields, revisions=revs))

    async def delete(self, request: Request) -> Response:
        name = request.path_params["name"]
        await self.control.delete(name)
        return _ok(s.Deleted(deleted=name))

    async def revisions(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.control.require(name)
        revs = [
            s.RevisionInfo(number=r.number, sha256=r.sha256, created_at=r.created_at, spec=r.spec)
            for r in await self.control.store.revisions(name)
        ]
        return _ok(s.RevisionList(revisions=revs))

    async def deploy(self, request: Request) -> Response:
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
        deployed = await self.control.deploy(bytes(data), name or "function")
        return _ok(
            s.DeployResponse(functions=deployed), 201 if any(d.created for d in deployed) else 200
        )

    async def scale(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await _body(request, s.ScaleRequest)
        count = await self.control.scale(name, body.instances)
        return _ok(s.ScaleResponse(name=name, instances=count))

    async def activations(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.control.require(name)
        limit = _int(request, "limit", 50, 1, 10_000)
        return _ok(s.ActivationList(activations=await self.control.store.activations(name, limit)))

    async def logs(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.control.require(name)
        since = _float(request, "since", 0.0)
        limit = _int(request, "limit", 1000, 1, 100_000)
        follow = request.query_params.get("follow", "false").lower() in ("1", "true", "yes")
        return StreamingResponse(
            self._tail(name, since, limit, follow), media_type="application/x-ndjson"
        )

    async def _tail(
        self, name: str, since: float, limit: int, follow: bool
    ) -> AsyncIterator[bytes]:
        after = 0
        store = self.control.store
        while True:
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

    async def doctor(self, request: Request) -> Response:
        return _ok(s.CheckList(checks=detect()))

    async def openapi(self, request: Request) -> Response:
        return _ok(document())

    async def healthz(self, request: Request) -> Response:
        return _ok({"status": "ok", "time": time.time()})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


async def _body(request: Request, kind: type[Any]) -> Any:
    raw = await request.body()
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise UserError(f"invalid request body: {exc}", code="bad_request") from None
    except msgspec.DecodeError as exc:
        raise UserError(f"request body is not valid JSON: {exc}", code="bad_request") from None


def _int(request: Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise UserError(f"query parameter {key}={raw!r} must be a whole number {low}-{high}")
    return int(raw)


def _float(request: Request, key: str, default: float) -> float:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"query parameter {key}={raw!r} must be a unix timestamp") from None


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
        Route("/api/v1/functions/{name}/logs", api.logs),
        Route("/api/v1/functions/{name}/activations", api.activations),
    ]

    async def ember_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EmberError)
        return _error(exc)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(EmberError(f"internal error: {type(exc).__name__}: {exc}"))

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
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
