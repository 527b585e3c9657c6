"""Starlette routes of `/api/v1`: thin handlers over the control plane's services; JSON errors."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import cast

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match, Route

from ember import auth
from ember.api import params, views
from ember.api import schemas as s
from ember.api.control import Control
from ember.api.names import DEFAULT_NS, validate_namespace
from ember.api.openapi import document
from ember.api.triggers import TriggerApi
from ember.auth import KeyTable, Principal
from ember.errors import Conflict, EmberError, Forbidden, NotFound, UserError
from ember.layers.builder import Progress
from ember.pool.target import Target
from ember.queue.base import DEAD, STATUSES, Invocation
from ember.queue.dispatcher import Dispatcher
from ember.queue.views import InvocationList, info
from ember.secretbox import MAX_SECRET_BYTES
from ember.spec import Quota
from ember.telemetry.metrics import Metrics
from ember.triggers.manager import Triggers

log = logging.getLogger("ember.api")
_json = msgspec.json.Encoder()
_ID = re.compile(r"[0-9a-f]{32}")


def _ok(body: object, status: int = 200) -> Response:
    return Response(_json.encode(body), status, media_type="application/json")


def _error(exc: EmberError) -> Response:
    return Response(
        _json.encode(exc.to_json()), exc.status, headers=exc.headers, media_type="application/json"
    )


class Api:
    """Every handler first authenticates: a key, its scope for the namespace, its rate."""

    def __init__(self, control: Control, metrics: Metrics, invocations: Dispatcher) -> None:
        self.control = control
        self.metrics = metrics
        self.invocations = invocations
        self._deploying: set[asyncio.Task[None]] = set()  # streamed deploys under way

    @property
    def _keys(self) -> KeyTable:
        return self.control.keys.table

    def _who(self, request: Request) -> Principal:
        principal = self._keys.verify(request.headers.get("authorization"))
        self._keys.throttle(principal, time.monotonic())
        return principal

    def _allow(self, request: Request, action: str) -> tuple[Principal, str]:
        """The caller, if it may `action` in the request's namespace (?namespace=, default)."""
        principal = self._who(request)
        namespace = validate_namespace(request.query_params.get("namespace", DEFAULT_NS))
        self._keys.require(principal, action, namespace)
        return principal, namespace

    def _admin(self, request: Request) -> None:
        principal = self._who(request)
        if not principal.admin:
            raise Forbidden(f"key {principal.key.id} is not an admin key; this call needs one")

    async def functions(self, request: Request) -> Response:
        if "namespace" in request.query_params:
            _, namespace = self._allow(request, "read")
            visible: set[str] | None = {namespace}
        else:  # every namespace the key may read
            visible = self._who(request).namespaces("read")
        records = {rec.name: rec for rec in await self.control.store.functions()}
        out = []
        for target in self.control.functions.serving_in(visible):
            info = views.function_info(self.control.pool, self.control.address, target)
            rec = records.get(target.qualified)
            if rec is not None:
                info = msgspec.structs.replace(
                    info, created_at=rec.created_at, updated_at=rec.updated_at
                )
            out.append(info)
        return _ok(s.FunctionList(functions=out))

    def _target(self, request: Request, action: str) -> Target:
        _, namespace = self._allow(request, action)
        return self.control.functions.require(namespace, request.path_params["name"])

    async def function(self, request: Request) -> Response:
        target = self._target(request, "read")
        info = views.function_info(self.control.pool, self.control.address, target)
        rec = await self.control.store.function(target.qualified)
        revs = await views.revision_infos(self.control.store, target.qualified)
        fields = msgspec.structs.asdict(info)
        traffic = None
        if rec is not None:
            fields.update(created_at=rec.created_at, updated_at=rec.updated_at)
            traffic = views.traffic_of(rec)
        return _ok(s.FunctionDetail(**fields, revisions=revs, traffic=traffic))

    async def delete(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        name = request.path_params["name"]
        await self.control.deploys.delete(namespace, name)
        return _ok(s.Deleted(deleted=name))

    async def revisions(self, request: Request) -> Response:
        target = self._target(request, "read")
        return _ok(
            s.RevisionList(
                revisions=await views.revision_infos(self.control.store, target.qualified)
            )
        )

    async def builds(self, request: Request) -> Response:
        target = self._target(request, "read")
        builds = await self.control.store.builds(target.qualified)
        fields = {f.name for f in msgspec.structs.fields(s.BuildInfo)}  # the record less its key
        infos = [
            s.BuildInfo(**{k: v for k, v in msgspec.structs.asdict(b).items() if k in fields})
            for b in builds
        ]
        return _ok(s.BuildList(builds=infos))

    async def traffic(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        body = await params.body(request, s.TrafficRequest)
        name = request.path_params["name"]
        fn = await self.control.traffic.set_traffic(namespace, name, body.aliases)
        return _ok(views.traffic_of(fn))

    async def rollback(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        body = await params.body(request, s.RollbackRequest)
        fn = await self.control.traffic.rollback(namespace, request.path_params["name"], body.to)
        return _ok(views.traffic_of(fn))

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
        canary = params.canary_plan(request)
        allow = params.boolean(request, "allow_trigger_errors", False)
        if "application/x-ndjson" in request.headers.get("accept", ""):
            return self._deploy_stream(bytes(data), name or "function", namespace, canary, allow)
        deployed = await self.control.deploys.deploy(
            bytes(data), name or "function", namespace, canary, allow_trigger_errors=allow
        )
        return _ok(
            s.DeployResponse(functions=deployed), 201 if any(d.created for d in deployed) else 200
        )

    def _deploy_stream(
        self, data: bytes, name: str, namespace: str, canary: s.CanaryPlan | None, allow: bool
    ) -> StreamingResponse:
        """The deploy's steps as they happen, one JSON per line, and its outcome last. The
        deploy runs to its end even if the client goes away (it is never cut half-way)."""
        lines: asyncio.Queue[bytes | None] = asyncio.Queue()

        def report(function: str, step: Progress) -> None:
            event = s.DeployProgress(
                function, step.phase, step.packages, step.reused, step.bytes, step.ms
            )
            lines.put_nowait(_json.encode(event) + b"\n")

        async def deploy() -> None:
            last: s.DeployDone | s.DeployFailed
            try:
                done = await self.control.deploys.deploy(
                    data, name, namespace, canary, report, allow_trigger_errors=allow
                )
                status = 201 if any(d.created for d in done) else 200
                last = s.DeployDone(status, s.DeployResponse(functions=done))
            except EmberError as exc:
                last = s.DeployFailed(exc.status, s.ErrorDetail(exc.code, exc.message, exc.detail))
            except Exception as exc:
                log.exception("unexpected error in a streamed deploy")
                error = EmberError(f"internal error: {type(exc).__name__}: {exc}")
                last = s.DeployFailed(error.status, s.ErrorDetail(error.code, error.message))
            lines.put_nowait(_json.encode(last) + b"\n")
            lines.put_nowait(None)

        task = asyncio.get_running_loop().create_task(deploy())
        self._deploying.add(task)
        task.add_done_callback(self._deploying.discard)

        async def stream() -> AsyncIterator[bytes]:
            while (line := await lines.get()) is not None:
                yield line

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    async def scale(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        name = request.path_params["name"]
        body = await params.body(request, s.ScaleRequest)
        count = await self.control.deploys.scale(namespace, name, body.instances)
        return _ok(s.ScaleResponse(name=name, instances=count))

    async def activations(self, request: Request) -> Response:
        target = self._target(request, "read")
        limit = params.integer(request, "limit", 50, 1, 10_000)
        rows = await self.control.store.activations(target.qualified, limit)
        return _ok(s.ActivationList(activations=rows))

    async def logs(self, request: Request) -> Response:
        target = self._target(request, "read")
        since = params.timestamp(request, "since", 0.0)
        limit = params.integer(request, "limit", 1000, 1, 100_000)
        follow = params.boolean(request, "follow", False)
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
            if not self._keys.active(key_id):  # revoked while following
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
        namespaces = self.control.namespaces
        out = [
            s.NamespaceInfo(name=ns.name, quota=ns.quota, uid=namespaces.uid(ns))
            for ns in namespaces.all()
            if visible is None or ns.name in visible
        ]
        return _ok(s.NamespaceList(namespaces=out))

    async def set_quota(self, request: Request) -> Response:
        self._admin(request)
        namespace = request.path_params["namespace"]
        quota = await params.body(request, Quota)
        ns = await self.control.namespaces.set_quota(namespace, quota)
        uid = self.control.namespaces.uid(ns)
        return _ok(s.NamespaceInfo(name=ns.name, quota=ns.quota, uid=uid))

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
        body = await params.body(request, s.KeyRequest)
        token = await self.control.keys.create(body.name, body.scopes, body.rate, body.burst)
        key_id = token.split("_")[1]
        return _ok(s.NewKey(id=key_id, key=token, scopes=sorted(set(body.scopes))), 201)

    async def revoke_key(self, request: Request) -> Response:
        self._admin(request)
        key_id = request.path_params["key_id"]
        await self.control.keys.revoke(key_id)
        return _ok(s.Deleted(deleted=key_id))

    async def secrets(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        return _ok(s.SecretList(namespace=namespace, names=self.control.secrets.names(namespace)))

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
        created = await self.control.secrets.set(namespace, name, bytes(value))
        return _ok(s.SecretSet(namespace=namespace, name=name), 201 if created else 200)

    async def delete_secret(self, request: Request) -> Response:
        _, namespace = self._allow(request, "deploy")
        name = request.path_params["name"]
        await self.control.secrets.delete(namespace, name)
        return _ok(s.Deleted(deleted=name))

    async def doctor(self, request: Request) -> Response:
        self._who(request)  # what this server's functions get, as probed at its start
        return _ok(s.CheckList(checks=self.control.pool.protections))

    async def layers(self, request: Request) -> Response:
        """Installed requirements on this node (admin: their packages span namespaces)."""
        self._admin(request)
        used = await self.control.store.layer_revisions()
        found = await asyncio.to_thread(self.control.layers.installed)
        out = [
            s.InstalledLayer(
                digest=meta.digest,
                packages=meta.packages,
                bytes=meta.bytes,
                build_ms=meta.build_ms,
                created_at=meta.created_at,
                revisions=used.get(meta.digest, 0),
            )
            for meta in found
        ]
        zygotes = [
            s.LayerZygoteInfo(
                namespace=lz.namespace,
                function=lz.function.partition("/")[2],
                layer=lz.layer,
                preload=lz.preload,
                import_ms=lz.ready.result().import_ms if lz.usable else None,
                forks=lz.forks,
                running=lz.children,
                memory_kb=lz.measured_kb,
            )
            for lz in self.control.pool.layers.by_key.values()
        ]
        total = sum(x.bytes for x in out)
        return _ok(s.LayerList(layers=out, count=len(out), bytes=total, zygotes=zygotes))

    # ---- async invocations ----
    async def _invocation(self, request: Request, action: str) -> Invocation:
        """The invocation of the path, if the key may `action` in its namespace (else 404:
        whether an id exists is not told to who may not see it)."""
        principal = self._who(request)
        id = request.path_params["id"]
        inv = await self.invocations.queue.get(id) if _ID.fullmatch(id) else None
        if inv is not None:
            try:
                self._keys.require(principal, action, inv.function.partition("/")[0])
            except Forbidden:
                inv = None
        if inv is None:
            raise NotFound(
                f"no async invocation {id!r} (ended ones are kept for "
                f"{self.control.config.async_retention / 3600:g} h)",
                code="no_invocation",
            )
        return inv

    async def invocation(self, request: Request) -> Response:
        return _ok(info(self.invocations.shown(await self._invocation(request, "read"))))

    async def cancel_invocation(self, request: Request) -> Response:
        inv = await self._invocation(request, "invoke")
        cancelled = await self.invocations.cancel(inv)
        if cancelled is None:
            raise Conflict(
                f"invocation {inv.id} is {inv.status}; only a queued one can be cancelled",
                code="not_queued",
            )
        return _ok(info(cancelled))

    async def replay_invocation(self, request: Request) -> Response:
        inv = await self._invocation(request, "deploy")
        if inv.status != DEAD:
            raise Conflict(
                f"invocation {inv.id} is {inv.status}; only a dead one can be replayed",
                code="not_dead",
            )
        replayed = await self.invocations.queue.replay(inv.function, [inv.id], time.time())
        if not replayed:
            raise Conflict(f"invocation {inv.id} was replayed meanwhile", code="not_dead")
        self.invocations.wake(inv.function)
        return _ok(info(replayed[0]))

    async def function_invocations(self, request: Request) -> Response:
        target = self._target(request, "read")
        status = request.query_params.get("status") or None
        if status is not None and status not in STATUSES:
            raise UserError(
                f"status={status!r} is not one of {', '.join(STATUSES)}", code="bad_request"
            )
        limit = params.integer(request, "limit", 50, 1, 10_000)
        found = await self.invocations.queue.list(target.qualified, status, limit)
        return _ok(InvocationList([info(self.invocations.shown(inv)) for inv in found]))

    async def dead_letters(self, request: Request) -> Response:
        target = self._target(request, "read")
        limit = params.integer(request, "limit", 50, 1, 10_000)
        found = await self.invocations.queue.list(target.qualified, DEAD, limit)
        return _ok(InvocationList([info(self.invocations.shown(inv)) for inv in found]))

    async def replay_dead(self, request: Request) -> Response:
        target = self._target(request, "deploy")
        body = await params.body(request, s.ReplayRequest)
        ids = None if body.all else body.ids  # all: every dead one, whatever ids lists
        replayed = await self.invocations.queue.replay(target.qualified, ids, time.time())
        if replayed:
            self.invocations.wake(target.qualified)
        return _ok(s.Replayed([inv.id for inv in replayed]))

    async def purge_dead(self, request: Request) -> Response:
        target = self._target(request, "deploy")
        return _ok(s.Purged(await self.invocations.queue.purge(target.qualified)))

    async def openapi(self, request: Request) -> Response:
        self._who(request)
        return _ok(document())

    async def healthz(self, request: Request) -> Response:
        return _ok({"status": "ok", "time": time.time()})

    async def metrics_endpoint(self, request: Request) -> Response:
        # Copied on the loop (functions called since the last scrape, the pool's gauges) and
        # formatted there in slices of a millisecond, so requests keep being served meanwhile.
        body = await (await self.metrics.scrape_async()).render_async()
        return Response(body, media_type="text/plain; version=0.0.4")


def build(
    control: Control, metrics: Metrics, invocations: Dispatcher, triggers: Triggers | None = None
) -> Starlette:
    api = Api(control, metrics, invocations)
    hooks = TriggerApi(api, cast(Triggers, triggers))
    routes = [
        Route("/healthz", api.healthz),
        Route("/metrics", api.metrics_endpoint),
        Route("/api/v1/openapi.json", api.openapi),
        Route("/api/v1/doctor", api.doctor),
        Route("/api/v1/layers", api.layers),
        Route("/api/v1/deploy", api.deploy, methods=["POST"]),
        Route("/api/v1/functions", api.functions),
        Route("/api/v1/functions/{name}", api.function),
        Route("/api/v1/functions/{name}", api.delete, methods=["DELETE"]),
        Route("/api/v1/functions/{name}/revisions", api.revisions),
        Route("/api/v1/functions/{name}/builds", api.builds),
        Route("/api/v1/functions/{name}/scale", api.scale, methods=["POST"]),
        Route("/api/v1/functions/{name}/traffic", api.traffic, methods=["PUT"]),
        Route("/api/v1/functions/{name}/rollback", api.rollback, methods=["POST"]),
        Route("/api/v1/functions/{name}/logs", api.logs),
        Route("/api/v1/functions/{name}/activations", api.activations),
        Route("/api/v1/functions/{name}/invocations", api.function_invocations),
        Route("/api/v1/functions/{name}/dlq", api.dead_letters),
        Route("/api/v1/functions/{name}/dlq", api.purge_dead, methods=["DELETE"]),
        Route("/api/v1/functions/{name}/dlq/replay", api.replay_dead, methods=["POST"]),
        Route("/api/v1/invocations/{id}", api.invocation),
        Route("/api/v1/invocations/{id}", api.cancel_invocation, methods=["DELETE"]),
        Route("/api/v1/invocations/{id}/replay", api.replay_invocation, methods=["POST"]),
        Route("/api/v1/namespaces", api.namespaces),
        Route("/api/v1/namespaces/{namespace}/quota", api.set_quota, methods=["PUT"]),
        Route("/api/v1/keys", api.keys),
        Route("/api/v1/keys", api.create_key, methods=["POST"]),
        Route("/api/v1/keys/{key_id}", api.revoke_key, methods=["DELETE"]),
        Route("/api/v1/secrets", api.secrets),
        Route("/api/v1/secrets/{name}", api.set_secret, methods=["PUT"]),
        Route("/api/v1/secrets/{name}", api.delete_secret, methods=["DELETE"]),
        Route("/api/v1/triggers", hooks.all),
        Route("/api/v1/functions/{name}/triggers", hooks.of_function),
        Route("/api/v1/functions/{name}/triggers", hooks.add, methods=["POST"]),
        Route("/api/v1/functions/{name}/triggers/{trigger}", hooks.remove, methods=["DELETE"]),
        Route("/api/v1/functions/{name}/triggers/{trigger}/pause", hooks.pause, methods=["POST"]),
        Route("/api/v1/functions/{name}/triggers/{trigger}/resume", hooks.resume, methods=["POST"]),
        Route("/hooks/{trigger_id}", hooks.hook, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            EmberError: _ember_error,
            Exception: _unexpected,
            404: _not_found,
            405: _not_found,
        },
    )


async def _ember_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EmberError)
    return _error(exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error(EmberError(f"internal error: {type(exc).__name__}: {exc}"))


async def _not_found(request: Request, exc: Exception) -> Response:
    code = getattr(exc, "status_code", 404)
    headers = {}
    if code == 405:  # the methods of every route of the path, not only of the first one
        allowed = {
            method
            for route in request.app.routes
            if route.matches(request.scope)[0] is Match.PARTIAL
            for method in getattr(route, "methods", None) or ()
        }
        headers["Allow"] = ", ".join(sorted(allowed))
    what = "not_found" if code == 404 else "method_not_allowed"
    message = (
        f"{request.method} {request.url.path} is not an Ember endpoint; see /api/v1/openapi.json"
    )
    return Response(
        _json.encode({"error": {"code": what, "message": message}}),
        code,
        headers=headers,
        media_type="application/json",
    )
