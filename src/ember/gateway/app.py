"""`ANY /fn/{name}/{path…}`: route, admit, body in, pool, response out, records appended.

The HTTP front (`ember.server.http`) drives each request's `Exchange` straight from its parser
callbacks: no ASGI scope, messages or task per body chunk on the hot path."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import NamedTuple

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

PREFIX = "/fn/"
log = logging.getLogger("ember.gateway")
_json = msgspec.json.Encoder()


class Response(NamedTuple):
    status: int
    headers: Headers  # the response's own headers: no framing (the HTTP front adds it)
    body: bytes


class Gateway:
    """What the HTTP front asks for each request under /fn/: `open()` at the end of its head,
    `Exchange.feed()` per chunk of body, `Exchange.run()` once the body is whole."""

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
        # Kept, not asked for per request: asyncio.get_running_loop() makes a getpid() system
        # call each time (to notice a fork).
        self.loop = asyncio.get_running_loop()

    def open(
        self, method: str, path: str, raw_path: bytes, query: bytes, headers: Headers
    ) -> Exchange:
        """A request whose head has arrived: routed and admitted (or already answered, when
        `response` is set: unknown function, no key, a declared body over the limit)."""
        exchange = Exchange(self, method, path, raw_path, query, headers)
        try:
            exchange.admit()
        except EmberError as exc:
            exchange.fail(exc)
        return exchange

    def _authorize(self, target: Target, headers: Headers) -> Headers:
        """A private function: the caller's key must allow invoke in its namespace. The key is
        Ember's, not the function's: it is taken out of the headers the function sees."""
        authorization = _header(headers, b"authorization")
        principal = self.keys.verify(authorization.decode("latin-1") if authorization else None)
        self.keys.require(principal, "invoke", target.namespace)
        self.keys.throttle(principal, time.monotonic())
        return _without_authorization(headers)

    def _hold(self, n: int) -> None:
        if self.buffered + n > self.max_buffered:
            raise PlatformError(
                f"the server holds {self.buffered // (1024 * 1024)} MB of request bodies, "
                f"its limit is {self.max_buffered // (1024 * 1024)} MB (ember up "
                "--max-buffered-mb); retry later",
                code="server_busy",
                headers={"Retry-After": "1"},
            )
        self.buffered += n

    def _record(self, ex: Exchange, target: Target, status: int, error: str | None) -> None:
        elapsed = time.perf_counter() - ex.t0
        ms = elapsed * 1000.0
        self.telemetry.activation(
            ActivationRecord(
                id=ex.rid,
                function=target.qualified,
                revision=target.number,
                start=ex.started,
                duration_ms=ms,
                status=status,
                tier=ex.tier,
                instance=ex.instance,
                peak_memory_kb=ex.peak,
                billed_ms=billed_ms(ms),
                error=error,
            )
        )
        self.metrics.observe(target.qualified, status, elapsed, ex.tier)
        if not (ex.caller and status == 504):  # a deadline the caller chose, not the code's
            self.outcomes.add(target.qualified, target.number, status, elapsed)


class Exchange:
    """One request to a function, from the end of its head to its response."""

    __slots__ = (
        "alias",
        "asked_timeout",
        "authorized",
        "caller",
        "chunks",
        "gateway",
        "headers",
        "held",
        "instance",
        "key",
        "method",
        "name",
        "path",
        "peak",
        "query",
        "raw_path",
        "response",
        "rest",
        "rid",
        "route",
        "sent",
        "served_alias",
        "size",
        "started",
        "t0",
        "target",
        "tier",
    )

    def __init__(
        self,
        gateway: Gateway,
        method: str,
        path: str,
        raw_path: bytes,
        query: bytes,
        headers: Headers,
    ) -> None:
        self.started, self.t0 = time.time(), time.perf_counter()
        self.gateway = gateway
        self.method, self.path, self.raw_path, self.query = method, path, raw_path, query
        self.sent = self.headers = headers  # as sent; once admitted, without Ember's key
        self.rid = request_id()
        self.key, self.name, self.alias, self.rest = gateway.routes.resolve(path[len(PREFIX) :])
        self.route: Route | None = None
        self.target: Target | None = None
        self.served_alias = ""  # the alias that chose the target (a name or a weighted split)
        self.asked_timeout: bytes | None = None  # X-Ember-Timeout as sent
        self.authorized = False
        self.response: Response | None = None
        self.chunks: list[bytes] = []
        self.size = self.held = 0  # body bytes received; of them counted in `buffered`
        self.tier, self.instance, self.peak = "none", "", 0
        self.caller = False  # the caller shortened the deadline: its 504 says nothing of the code

    def admit(self) -> None:
        """Route and check the head: one pass over the headers for everything the gateway
        reads in them (each pass and call costs on the hot path)."""
        gateway = self.gateway
        route = self.route = gateway.routes.get(self.key)
        if route is None:
            raise _no_function(self.key, self.name)
        key_sent = length = False
        sticky = None
        for name, value in self.headers:
            if name == b"authorization":
                key_sent = key_sent or is_ember_token(value)
            elif name == b"content-length":
                length = value.isdigit() and int(value) > gateway.max_body
            elif name == b"x-ember-timeout":
                self.asked_timeout = value
            elif name == b"x-request-id":
                sticky = value[:200] or None
        target, self.served_alias = _choose(
            route, self.alias, sticky or self.rid.encode(), self.name
        )
        self.target = target
        self.authorized = _private(route, target)
        if self.authorized:
            self.headers = gateway._authorize(target, self.headers)
        elif key_sent:  # an Ember key sent to a public function: never shown to it
            self.headers = _without_authorization(self.headers)
        if length:
            raise _too_large(int(_header(self.headers, b"content-length") or 0), gateway.max_body)

    def feed(self, chunk: bytes) -> None:
        """A piece of the body; over the body limit or the server's budget of held bodies it
        answers (413 / 503) at once."""
        if self.response is not None:
            return
        self.size += len(chunk)
        try:
            if self.size > self.gateway.max_body:
                raise _too_large(self.size, self.gateway.max_body)
            self.gateway._hold(len(chunk))
        except EmberError as exc:
            self.fail(exc)
            return
        self.held += len(chunk)
        self.chunks.append(chunk)

    async def run(self) -> Response:
        """The whole body has arrived: invoke the function; never raises."""
        try:
            return await self._invoke()
        except EmberError as exc:
            return self.fail(exc)
        except Exception as exc:  # a bug of ours: answer, record, log; never a bare 500
            log.exception("invocation %s of %s failed inside Ember", self.rid, self.key)
            return self.fail(_internal(exc))
        finally:
            self.close()

    async def _invoke(self) -> Response:
        gateway = self.gateway
        route = gateway.routes.get(self.key) or self.route  # a deploy may have landed meanwhile
        assert route is not None and self.target is not None
        target, alias, headers = self.target, self.served_alias, self.headers
        if route is not self.route:
            sticky = _header(self.sent, b"x-request-id")
            target, alias = _choose(route, self.alias, sticky or self.rid.encode(), self.name)
            self.target = target
            if _private(route, target) and not self.authorized:  # it became private meanwhile
                headers = gateway._authorize(target, self.sent)
        timeout = _timeout(self.asked_timeout, target)
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        msg = Invoke(
            id=self.rid,
            method=self.method,
            path="/" + self.rest,
            raw_path=_raw_rest(self.path, self.raw_path, self.rest)
            if b"%" in self.raw_path
            else "/" + self.rest,
            query=self.query,
            headers=headers,
            body=body,
            deadline=self.started + timeout,
            revision=target.number,
        )
        loop_deadline = gateway.loop.time() + timeout
        self.caller = timeout < target.spec.timeout
        result, self.tier, inst = await gateway.pool.open_revision(target).invoke(
            msg, loop_deadline, caller_deadline=self.caller
        )
        self.instance, self.peak = inst.id, result.max_rss_kb
        if result.error is not None and result.error.kind == "memory":
            raise _memory_error(target, result)
        response = Response(
            result.status,
            _function_headers(result.headers, target) + self._ember_headers(alias),
            result.body,
        )
        error = result.error.error_type if result.error is not None else None
        gateway._record(self, target, result.status, error)
        return response

    def fail(self, exc: EmberError) -> Response:
        """Answer with the error (recorded when the request reached a function)."""
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        body = _json.encode({"error": _error_body(exc, self.rid)})
        self.response = Response(exc.status, headers + self._ember_headers(""), body)
        if self.target is not None:
            self.gateway._record(self, self.target, exc.status, exc.code)
        self.close()
        return self.response

    def close(self) -> None:
        """Give the body's bytes back to the server's budget (the front calls this when the
        client goes away before `run`)."""
        self.gateway.buffered -= self.held
        self.held = 0
        self.chunks = []

    def _ember_headers(self, alias: str) -> Headers:
        extra = [(b"x-ember-request-id", self.rid.encode())]
        if self.target is not None:
            extra.append((b"x-ember-revision", str(self.target.number).encode()))
        if alias:
            extra.append((b"x-ember-alias", alias.encode()))
        if self.tier != "none":
            extra.append((b"x-ember-start", self.tier.encode()))
        return extra


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


def _no_function(key: str, name: str) -> NotFound:
    where = "" if key.startswith("default/") else f" in namespace '{key.split('/')[0]}'"
    return NotFound(
        f"no function named '{name}'{where}; deploy it with `ember deploy` "
        "or list functions with `ember ls`"
    )


def _raw_rest(path: str, raw_path: bytes, rest: str) -> str:
    """The path after /fn/[NAMESPACE/]NAME as sent (percent-encoding kept), for `req.raw_path`."""
    after = path[len(PREFIX) :]
    taken = after[: len(after) - len(rest)].rstrip("/").count("/") + 3  # "", "fn", the name
    parts = (raw_path or path.encode()).split(b"/", taken)
    return "/" + (parts[taken].decode("latin-1") if len(parts) > taken else "")


def _private(route: Route, target: Target) -> bool:
    """A function is as private as its serving revision: an alias of an older, public
    revision (or a canary) does not open it to callers without a key."""
    return target.spec.access == "private" or route.main.spec.access == "private"


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _without_authorization(headers: Headers) -> Headers:
    return [(k, v) for k, v in headers if k != b"authorization"]


def _choose(route: Route, alias: str, sticky: bytes, name: str) -> tuple[Target, str]:
    """`/fn/NAME@ALIAS` reaches the alias; `/fn/NAME` the split or the serving revision.
    `sticky` is what a weighted split hashes: the caller's X-Request-Id (a retry that repeats
    it lands on the same revision), else Ember's own request id."""
    if not alias:
        return route.pick(sticky[:200]) if route.split else (route.main, "")
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


def _timeout(raw: bytes | None, target: Target) -> float:
    """The function's timeout, or less when the caller sends `X-Ember-Timeout: SECONDS` (a
    deadline of its own, e.g. what its client still waits; never more than the function's)."""
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
    """32 random hex digits; any prefix of them (the CLI shows 8) tells requests apart. The
    kernel's randomness is read 4 KB at a time: one getrandom() per request cost ~3 % of the
    server's time under load."""
    global _random_at
    if _random_at >= len(_random):
        _random[:] = os.urandom(len(_random))
        _random_at = 0
    _random_at += 16
    return _random[_random_at - 16 : _random_at].hex()


_random = bytearray(4096)
_random_at = len(_random)


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
