"""ASGI handler for `ANY /fn/{name}/{path…}`: body in, pool, response out, records appended."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any

import msgspec

from ember.auth import KeyTable, is_ember_token
from ember.errors import (
    EmberError,
    FunctionError,
    FunctionMemoryExceeded,
    NotFound,
    PlatformError,
    TooLarge,
    UserError,
)
from ember.gateway.router import Route, RouteTable
from ember.pool.manager import Pool
from ember.pool.target import Target
from ember.runtime.convert import BAD_HEADER_VALUE, HEADER_TOKEN, RESERVED_HEADERS
from ember.telemetry.buffer import TelemetryBuffer, billed_ms
from ember.telemetry.metrics import Metrics
from ember.telemetry.outcomes import Outcomes
from ember.telemetry.records import ActivationRecord
from ember.wire.messages import Headers, Invoke, Result

Scope = dict[str, Any]
PREFIX = "/fn/"
log = logging.getLogger("ember.gateway")
_json = msgspec.json.Encoder()


class Gateway:
    def __init__(
        self,
        routes: RouteTable,
        pool: Pool,
        telemetry: TelemetryBuffer,
        metrics: Metrics,
        keys: KeyTable,
        max_body_bytes: int,
        outcomes: Outcomes,
        max_buffered_bytes: int,
    ) -> None:
        self.outcomes = outcomes
        self.routes = routes
        self.keys = keys
        self.pool = pool
        self.telemetry = telemetry
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.max_buffered = max_buffered_bytes  # bodies of every request in memory at once
        self.buffered = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        started, t0 = time.time(), time.perf_counter()
        rid = request_id()
        key, name, alias, rest = self.routes.resolve(scope["path"][len(PREFIX) :])
        route = self.routes.get(key)
        target: Target | None = None
        tier, instance, result, peak = "none", "", None, 0
        caller = False  # the caller shortened the deadline: its 504 says nothing of the code
        held = [0]  # bytes of this request's body counted in self.buffered
        try:
            if route is None:
                raise _no_function(key, name)
            target, alias = _choose(route, alias, scope["headers"], rid, name)
            authorized = _private(route, target)
            headers = self._headers_for(target, scope["headers"], authorized)
            body = await self._body(scope, receive, held)
            route = self.routes.get(key) or route  # a deploy may have landed meanwhile
            target, alias = _choose(route, alias, scope["headers"], rid, name)
            if _private(route, target) and not authorized:  # it became private
                headers = self._authorize(target, scope["headers"])
            timeout = _timeout(headers, target)
            msg = _invoke(scope, rid, rest, headers, body, started + timeout, target.number)
            loop_deadline = asyncio.get_running_loop().time() + timeout
            caller = timeout < target.spec.timeout
            result, tier, inst = await self.pool.open_revision(target).invoke(
                msg, loop_deadline, caller_deadline=caller
            )
            instance, peak = inst.id, result.max_rss_kb
            if result.error is not None and result.error.kind == "memory":
                raise _memory_error(target, result)
            status = result.status
            headers = _function_headers(result.headers, target)
            await _respond(send, status, headers, result.body, rid, target, tier, alias)
            error = result.error.error_type if result.error is not None else None
        except EmberError as exc:
            status, error = exc.status, exc.code
            await self._error(send, exc, rid, target, tier)
        except Exception as exc:  # a bug of ours: answer, record, log; never a bare 500
            log.exception("invocation %s of %s failed inside Ember", rid, key)
            status, error = 500, "internal"
            await self._error(send, _internal(exc), rid, target, tier)
        finally:
            self.buffered -= held[0]
        elapsed = time.perf_counter() - t0
        if target is not None:
            self._record(target, rid, started, elapsed, status, tier, instance, peak, error)
            if not (caller and status == 504):  # a deadline the caller chose, not the code's
                self.outcomes.add(target.qualified, target.number, status, elapsed)

    def _headers_for(self, target: Target, headers: Headers, private: bool) -> Headers:
        """The headers the function gets: a private function's caller must hold an invoke
        key; an Ember key sent to a public one is dropped all the same."""
        if private:
            return self._authorize(target, headers)
        if any(k == b"authorization" and is_ember_token(v) for k, v in headers):
            return [(k, v) for k, v in headers if k != b"authorization"]
        return headers

    def _authorize(self, target: Target, headers: Headers) -> Headers:
        """A private function: the caller's key must allow invoke in its namespace. The key is
        Ember's, not the function's: it is taken out of the headers the function sees."""
        authorization = next((v for k, v in headers if k == b"authorization"), None)
        principal = self.keys.verify(authorization.decode("latin-1") if authorization else None)
        self.keys.require(principal, "invoke", target.namespace)
        self.keys.throttle(principal, time.monotonic())
        return [(k, v) for k, v in headers if k != b"authorization"]

    async def _body(self, scope: Scope, receive: Any, held: list[int]) -> bytes:
        """The whole body, counted in `held` (and the server's `buffered`) as it arrives: a
        request that would take the server past `max_buffered` bytes of bodies gets 503."""
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.max_body:
                raise _too_large(int(value), self.max_body)
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise PlatformError("client disconnected", code="client_closed", status=499)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _too_large(size, self.max_body)
            if chunk:
                self._hold(len(chunk), held)
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _hold(self, n: int, held: list[int]) -> None:
        if self.buffered + n > self.max_buffered:
            raise PlatformError(
                f"the server holds {self.buffered // (1024 * 1024)} MB of request bodies, "
                f"its limit is {self.max_buffered // (1024 * 1024)} MB (ember up "
                "--max-buffered-mb); retry later",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        self.buffered += n
        held[0] += n

    async def _error(
        self, send: Any, exc: EmberError, rid: str, target: Target | None, tier: str
    ) -> None:
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        await _respond(
            send,
            exc.status,
            headers,
            _json.encode({"error": _error_body(exc, rid)}),
            rid,
            target,
            tier,
        )

    def _record(
        self,
        target: Target,
        rid: str,
        started: float,
        elapsed: float,
        status: int,
        tier: str,
        instance: str,
        peak: int,
        error: str | None,
    ) -> None:
        ms = elapsed * 1000.0
        self.telemetry.activation(
            ActivationRecord(
                id=rid,
                function=target.qualified,
                revision=target.number,
                start=started,
                duration_ms=ms,
                status=status,
                tier=tier,
                instance=instance,
                peak_memory_kb=peak,
                billed_ms=billed_ms(ms),
                error=error,
            )
        )
        self.metrics.observe(target.qualified, status, elapsed, tier)


async def _respond(
    send: Any,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    rid: str,
    target: Target | None,
    tier: str,
    alias: str = "",
) -> None:
    extra = [(b"x-ember-request-id", rid.encode())]
    if target is not None:
        extra.append((b"x-ember-revision", str(target.number).encode()))
    if alias:
        extra.append((b"x-ember-alias", alias.encode()))
    if tier != "none":
        extra.append((b"x-ember-start", tier.encode()))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, *extra, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _function_headers(headers: Headers, target: Target) -> Headers:
    """The instance filters these too, but it runs the function's code: check again here.
    Framing and `X-Ember-*` headers are dropped; an invalid name or value is the function's
    error (502)."""
    out: Headers = []
    for name, value in headers:
        if not HEADER_TOKEN.match(name) or BAD_HEADER_VALUE.search(value):
            raise FunctionError(
                f"function '{target.function}' returned an invalid response header "
                f"{name[:40]!r}; names must be HTTP tokens, values without CR, LF or NUL",
                code="bad_response",
            )
        if name not in RESERVED_HEADERS and not name.startswith(b"x-ember-"):
            out.append((name, value))
    return out


def _invoke(
    scope: Scope, rid: str, rest: str, headers: Headers, body: bytes, deadline: float, number: int
) -> Invoke:
    return Invoke(
        id=rid,
        method=scope["method"],
        path="/" + rest,
        raw_path=_raw_rest(scope, rest),
        query=scope.get("query_string", b""),
        headers=headers,
        body=body,
        deadline=deadline,
        revision=number,
    )


def _no_function(key: str, name: str) -> NotFound:
    where = "" if key.startswith("default/") else f" in namespace '{key.split('/')[0]}'"
    return NotFound(
        f"no function named '{name}'{where}; deploy it with `ember deploy` "
        "or list functions with `ember ls`"
    )


def _raw_rest(scope: Scope, rest: str) -> str:
    """The path after /fn/[NAMESPACE/]NAME as sent (percent-encoding kept), for `req.raw_path`."""
    after = scope["path"][len(PREFIX) :]
    taken = after[: len(after) - len(rest)].rstrip("/").count("/") + 3  # "", "fn", the name
    parts = (scope.get("raw_path") or scope["path"].encode()).split(b"/", taken)
    return "/" + (parts[taken].decode("latin-1") if len(parts) > taken else "")


def _private(route: Route, target: Target) -> bool:
    """A function is as private as its serving revision: an alias of an older, public
    revision (or a canary) does not open it to callers without a key."""
    return target.spec.access == "private" or route.main.spec.access == "private"


def _sticky(headers: Headers, rid: str) -> bytes:
    """What weighted routing hashes: the caller's X-Request-Id (a retry that repeats it lands
    on the same revision), else Ember's own request id."""
    own = next((v for k, v in headers if k == b"x-request-id"), None)
    return own[:200] if own else rid.encode()


def _choose(route: Route, alias: str, headers: Headers, rid: str, name: str) -> tuple[Target, str]:
    """`/fn/NAME@ALIAS` reaches the alias; `/fn/NAME` the split or the serving revision."""
    if not alias:
        return route.pick(_sticky(headers, rid)) if route.split else (route.main, "")
    target = route.aliases.get(alias)
    if target is None:
        listed = ""
        if route.main.spec.access == "public":  # a private function's aliases are not shown
            listed = f" (aliases: {', '.join(sorted(route.aliases)) or 'none'})"
        raise NotFound(
            f"function '{name}' has no alias '{alias[:64]}'{listed}; set one with "
            f"`ember traffic {name} {alias[:64]}=REVISION:WEIGHT`"
        )
    return target, alias


def _timeout(headers: Headers, target: Target) -> float:
    """The function's timeout, or less when the caller sends `X-Ember-Timeout: SECONDS` (a
    deadline of its own, e.g. what its client still waits; never more than the function's)."""
    raw = next((v for k, v in headers if k == b"x-ember-timeout"), None)
    if raw is None:
        return target.spec.timeout
    try:
        asked = float(raw)
    except ValueError:
        asked = math.nan
    if not 0 < asked < math.inf:
        raise UserError(
            f"X-Ember-Timeout: {raw[:40].decode('latin-1')!r} is not a number of seconds above "
            f"0; send e.g. X-Ember-Timeout: 2.5 (at most the function's {target.spec.timeout:g} s)",
            code="bad_timeout",
        )
    return min(asked, target.spec.timeout)


def _internal(exc: Exception) -> PlatformError:
    return PlatformError(
        f"Ember failed while handling this request ({type(exc).__name__}); see the server log",
        code="internal",
        status=500,
    )


def _error_body(exc: EmberError, rid: str) -> dict[str, str]:
    body = {"code": exc.code, "message": exc.message, "requestId": rid}
    if exc.detail:
        body["detail"] = exc.detail  # e.g. the traceback of a failed import
    return body


def request_id() -> str:
    """32 random hex digits; any prefix of them (the CLI shows 8) tells requests apart."""
    return os.urandom(16).hex()


def _too_large(size: int, limit: int) -> TooLarge:
    return TooLarge(
        f"request body of {size} bytes exceeds the {limit // (1024 * 1024)} MB limit; "
        "send large payloads by reference (e.g. a URL)",
        code="body_too_large",
    )


def _memory_error(target: Target, result: Result) -> FunctionMemoryExceeded:
    return FunctionMemoryExceeded(
        f"function '{target.function}' exceeded its memory limit of {target.spec.memory} MB "
        f"(peak {result.max_rss_kb // 1024} MB RSS) and its instance was stopped; "
        "raise memory: in ember.yaml"
    )
