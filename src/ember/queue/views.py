"""An invocation as the API shows it and as destinations receive it: JSON-ready, bodies as
text when they are UTF-8, else base64."""

from __future__ import annotations

import base64

import msgspec

from ember.queue.base import Attempt, Headers, Invocation


class Message(msgspec.Struct, frozen=True):
    headers: list[tuple[str, str]]
    body: str
    body_base64: bool


class RequestInfo(Message, frozen=True, kw_only=True):
    method: str
    path: str
    query: str


class ResultInfo(Message, frozen=True, kw_only=True):
    status: int


class InvocationInfo(msgspec.Struct, frozen=True):
    id: str
    function: str
    namespace: str
    status: str
    accepted: float  # unix time
    not_before: float  # when its next attempt may start
    ended: float  # 0 until it ends
    reason: str  # why it ended as it did (empty for success)
    callback: str
    idempotency_key: str
    attempts: list[Attempt]
    request: RequestInfo
    result: ResultInfo | None


def _body(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), True


def _headers(headers: Headers) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def info(inv: Invocation) -> InvocationInfo:
    namespace, _, name = inv.function.partition("/")
    body, b64 = _body(inv.body)
    request = RequestInfo(
        headers=_headers(inv.headers),
        body=body,
        body_base64=b64,
        method=inv.method,
        path=inv.path,
        query=inv.query.decode("latin-1"),
    )
    result = None
    if inv.result is not None:
        body, b64 = _body(inv.result.body)
        result = ResultInfo(
            headers=_headers(inv.result.headers),
            body=body,
            body_base64=b64,
            status=inv.result.status,
        )
    return InvocationInfo(
        id=inv.id,
        function=name,
        namespace=namespace,
        status=inv.status,
        accepted=inv.accepted,
        not_before=inv.not_before,
        ended=inv.ended,
        reason=inv.reason,
        callback=inv.callback,
        idempotency_key=inv.idempotency_key,
        attempts=inv.attempts,
        request=request,
        result=result,
    )


class InvocationList(msgspec.Struct, frozen=True):
    invocations: list[InvocationInfo]
