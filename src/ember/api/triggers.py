"""`/api/v1/.../triggers` (ember triggers add/ls/rm/pause/resume) and `POST /hooks/{id}`, the
webhook triggers' door, which is authenticated by each trigger's HMAC signature, not a key."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ember import manifest
from ember.api import params
from ember.triggers.manager import Triggers, View
from ember.triggers.sources import webhook

if TYPE_CHECKING:
    from ember.api.app import Api

MAX_HOOK_BYTES = 1024 * 1024
HOOK_TIMEOUT = 25.0  # s: senders give up after 10-30 s (GitHub: 10) and send again
_HOOK_CODES = {
    401: "bad_signature",
    404: "not_found",
    409: "replayed",
    413: "too_large",
    503: "unavailable",
}
_json = msgspec.json.Encoder()


class TriggerList(msgspec.Struct, frozen=True):
    triggers: list[View]


class TriggerRequest(msgspec.Struct, frozen=True):
    trigger: dict[str, Any]  # one entry of `triggers:` in ember.yaml
    allow_errors: bool = False  # keep it (failing) if its settings or broker are wrong


class HookAccepted(msgspec.Struct, frozen=True):
    id: str  # the event's id
    status: str  # delivered (the function succeeded, or the event is queued durably)


def _ok(body: object, status: int = 200) -> Response:
    return Response(_json.encode(body), status, media_type="application/json")


class TriggerApi:
    def __init__(self, api: Api, triggers: Triggers) -> None:
        self.api = api
        self.triggers = triggers

    async def all(self, request: Request) -> Response:
        if "namespace" in request.query_params:
            visible: set[str] | None = {self.api._allow(request, "read")[1]}
        else:  # every namespace the key may read
            visible = self.api._who(request).namespaces("read")
        views = self.triggers.views(lambda fn: visible is None or fn.partition("/")[0] in visible)
        return _ok(TriggerList(views))

    async def of_function(self, request: Request) -> Response:
        key = self.api._target(request, "read").qualified
        return _ok(TriggerList(self.triggers.views(lambda fn: fn == key)))

    async def add(self, request: Request) -> Response:
        key = self.api._target(request, "deploy").qualified
        body = await params.body(request, TriggerRequest)
        spec = manifest.trigger_spec(body.trigger)
        return _ok(await self.triggers.add(key, spec, body.allow_errors), 201)

    async def remove(self, request: Request) -> Response:
        key = self.api._target(request, "deploy").qualified
        name = request.path_params["trigger"]
        await self.triggers.remove(key, name)
        return _ok({"deleted": name})

    async def pause(self, request: Request) -> Response:
        return await self._pause(request, True)

    async def resume(self, request: Request) -> Response:
        return await self._pause(request, False)

    async def _pause(self, request: Request, paused: bool) -> Response:
        key = self.api._target(request, "deploy").qualified
        return _ok(await self.triggers.pause(key, request.path_params["trigger"], paused))

    async def hook(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_HOOK_BYTES:
                return _hook_error(413, "a webhook body is at most 1 MB")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            status, answer = await asyncio.wait_for(
                webhook.receive(
                    request.path_params["trigger_id"], headers, bytes(body), time.time()
                ),
                HOOK_TIMEOUT,
            )
        except TimeoutError:
            status, answer = (
                503,
                {"error": f"the event was not delivered within {HOOK_TIMEOUT:g} s; send it again"},
            )
        if status < 400:
            return _ok(answer, status)
        return _hook_error(status, str(answer.get("error", answer)))


def _hook_error(status: int, message: str) -> Response:
    """Ember's error body (`{"error": {"code", "message"}}`); a 503 says when to retry."""
    code = _HOOK_CODES.get(status, "bad_request")
    response = _ok({"error": {"code": code, "message": message}}, status)
    if status == 503:
        response.headers["Retry-After"] = "5"
    return response
