"""`ANY /fn/{name}/{path…}`: route, admit, body in, pool, response out, records appended.

The HTTP front (`ember.server.http`) drives each request's `Exchange` straight from its parser
callbacks: no ASGI scope, messages or task per body chunk on the hot path."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import msgspec

from ember.auth import KeyTable, is_ember_token
from ember.errors import EmberError, PlatformError
from ember.gateway import rules
from ember.gateway.router import Route, RouteTable
from ember.gateway.rules import PREFIX
from ember.pool.call import Call
from ember.pool.instance import Instance
from ember.pool.manager import Pool
from ember.pool.target import Target
from ember.telemetry.buffer import TelemetryBuffer, billed_ms
from ember.telemetry.metrics import Metrics
from ember.telemetry.outcomes import Outcomes
from ember.telemetry.records import ActivationRecord
from ember.wire.messages import Headers, Invoke, Result

log = logging.getLogger("ember.gateway")
_json = msgspec.json.Encoder()

# How a request is handled: answered by the function (SYNC), queued for later with a 202
# (ACCEPT: /fn-async/, /async-function/, or X-Ember-Invocation-Type: async), or an attempt of
# a queued invocation (RUN), which takes the same route, checks and records as a SYNC one.
SYNC, ACCEPT, RUN = 0, 1, 2
ASYNC_PREFIXES = ("/fn-async/", "/async-function/")


class AsyncSink(Protocol):
    """Who takes ACCEPT exchanges once their body is whole (ember.queue.dispatcher): it stores
    the invocation durably, then calls `exchange.reply` with the 202."""

    def accept(self, exchange: Exchange) -> None: ...


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
        max_async_body_bytes: int = 1024 * 1024,
    ) -> None:
        self.outcomes = outcomes
        self.max_async_body = max_async_body_bytes
        self.sink: AsyncSink | None = None  # set when the server runs a queue
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
        mode = SYNC
        if not path.startswith(PREFIX):  # an async prefix: the rest as /fn/ would have it
            path = PREFIX + path.split("/", 2)[2]
            raw_path = b"/fn/" + raw_path.split(b"/", 2)[2]
            mode = ACCEPT
        exchange = Exchange(self, method, path, raw_path, query, headers, mode)
        try:
            exchange.admit()
        except EmberError as exc:
            exchange.fail(exc)
        return exchange

    def run(
        self,
        method: str,
        path: str,
        raw_path: bytes,
        query: bytes,
        headers: Headers,
        body: bytes,
        authorized: bool,
        call_id: str,
        attempt: int,
        done: Callable[[Exchange, Response], None],
    ) -> Exchange:
        """One attempt of a queued invocation, as a request to the function: routed, checked
        and recorded as one, its answer (or Ember's error) to `done`. `authorized`: the
        caller showed an invoke key for the namespace when the invocation was accepted (the
        key itself is never stored). `done` gets the exchange (its request id, error code,
        times) and the response, once."""
        exchange = Exchange(self, method, path, raw_path, query, headers, RUN)
        exchange.trusted, exchange.call_id, exchange.attempt = authorized, call_id, attempt

        def reply(response: Response) -> None:
            done(exchange, response)

        exchange.reply = reply
        try:
            exchange.admit()
        except EmberError as exc:
            reply(exchange.fail(exc))
            return exchange
        exchange.chunks = [body]
        exchange.start(reply)
        return exchange

    def _authorize(self, target: Target, headers: Headers) -> Headers:
        """A private function: the caller's key must allow invoke in its namespace. The key is
        Ember's, not the function's: it is taken out of the headers the function sees."""
        authorization = rules.header(headers, b"authorization")
        principal = self.keys.verify(authorization.decode("latin-1") if authorization else None)
        self.keys.require(principal, "invoke", target.namespace)
        self.keys.throttle(principal, time.monotonic())
        return rules.without_authorization(headers)

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
                attempt=ex.attempt,
                call_id=ex.call_id,
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
        "attempt",
        "authorized",
        "call_id",
        "caller",
        "chunks",
        "error",
        "gateway",
        "headers",
        "held",
        "instance",
        "key",
        "method",
        "mode",
        "name",
        "path",
        "peak",
        "query",
        "raw_path",
        "reply",
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
        "trusted",
    )

    def __init__(
        self,
        gateway: Gateway,
        method: str,
        path: str,
        raw_path: bytes,
        query: bytes,
        headers: Headers,
        mode: int = SYNC,
    ) -> None:
        self.started, self.t0 = time.time(), time.perf_counter()
        self.gateway = gateway
        self.mode = mode
        self.trusted = False  # RUN: the key was checked when the invocation was accepted
        self.call_id, self.attempt = "", 0
        self.error = ""  # Ember's error code when Ember answered instead of the function
        self.method, self.path, self.raw_path, self.query = method, path, raw_path, query
        self.sent = self.headers = headers  # as sent; once admitted, without Ember's key
        self.rid = rules.request_id()
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
            raise rules.no_function(self.key, self.name)
        key_sent = False
        length = 0
        sticky = None
        for name, value in self.headers:
            if name == b"authorization":
                key_sent = key_sent or is_ember_token(value)
            elif name == b"content-length":
                length = int(value) if value.isdigit() else 0
            elif name == b"x-ember-timeout":
                self.asked_timeout = value
            elif name == b"x-request-id":
                sticky = value[:200] or None
            elif name == b"x-ember-invocation-type" and self.mode == SYNC:  # (not RUN's)
                self.mode = ACCEPT if value.lower() == b"async" else SYNC
        target, self.served_alias = rules.choose(
            route, self.alias, sticky or self.rid.encode(), self.name
        )
        self.target = target
        self.authorized = rules.private(route, target)
        if self.authorized and not self.trusted:
            self.headers = gateway._authorize(target, self.headers)
        elif key_sent:  # an Ember key sent to a public function (or queued): never shown to it
            self.headers = rules.without_authorization(self.headers)
        if length > self.limit:
            raise rules.too_large(length, self.limit, self.mode == ACCEPT)

    @property
    def limit(self) -> int:
        """Bytes of body this request may send."""
        gateway = self.gateway
        return gateway.max_async_body if self.mode == ACCEPT else gateway.max_body

    def feed(self, chunk: bytes) -> None:
        """A piece of the body; over the body limit or the server's budget of held bodies it
        answers (413 / 503) at once."""
        if self.response is not None:
            return
        self.size += len(chunk)
        try:
            if self.size > self.limit:
                raise rules.too_large(self.size, self.limit, self.mode == ACCEPT)
            self.gateway._hold(len(chunk))
        except EmberError as exc:
            self.fail(exc)
            return
        self.held += len(chunk)
        self.chunks.append(chunk)

    def start(self, reply: Callable[[Response], None]) -> None:
        """The whole body has arrived: invoke the function; `reply` gets the response, once,
        from whatever callback ends the call (at once for a refusal). Never raises."""
        self.reply = reply
        try:
            if self.mode == ACCEPT:
                sink = self.gateway.sink
                if sink is None:
                    raise PlatformError("this server runs no queue for async invocations")
                sink.accept(self)
            else:
                self._submit()
        except Exception as exc:
            self.failed(exc)

    def _submit(self) -> None:
        gateway = self.gateway
        route = gateway.routes.get(self.key) or self.route  # a deploy may have landed meanwhile
        assert route is not None and self.target is not None
        target, headers = self.target, self.headers
        if route is not self.route:
            sticky = rules.header(self.sent, b"x-request-id")
            target, self.served_alias = rules.choose(
                route, self.alias, sticky or self.rid.encode(), self.name
            )
            self.target = target
            if rules.private(route, target) and not (self.authorized or self.trusted):
                headers = gateway._authorize(target, self.sent)  # it became private meanwhile
        timeout = rules.timeout(self.asked_timeout, target)
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        msg = Invoke(
            id=self.rid,
            method=self.method,
            path="/" + self.rest,
            raw_path=rules.raw_rest(self.path, self.raw_path, self.rest)
            if b"%" in self.raw_path
            else "/" + self.rest,
            query=self.query,
            headers=headers,
            body=body,
            deadline=self.started + timeout,
            revision=target.number,
        )
        self.caller = timeout < target.spec.timeout
        call = Call(msg, gateway.loop.time() + timeout, self, self.caller)
        gateway.pool.open_revision(target).submit(call)

    def resolved(self, result: Result, tier: str, inst: Instance) -> None:
        """The function answered (whatever its status)."""
        self.tier, self.instance, self.peak = tier, inst.id, result.max_rss_kb
        target = self.target
        assert target is not None
        try:
            if result.error is not None and result.error.kind == "memory":
                raise rules.memory_error(target, result)
            response = Response(
                result.status,
                rules.function_headers(result.headers, target)
                + self._ember_headers(self.served_alias),
                result.body,
            )
        except Exception as exc:
            self.failed(exc)
            return
        self.close()
        self.reply(response)  # the answer first: the records are not on the caller's path
        error = result.error.error_type if result.error is not None else None
        try:
            self.gateway._record(self, target, result.status, error)
        except Exception:
            log.exception("recording invocation %s of %s failed", self.rid, self.key)

    def failed(self, error: BaseException) -> None:
        """No answer from the function: an `EmberError` says why; anything else is a bug of
        ours, answered, recorded and logged, never a bare 500."""
        if not isinstance(error, EmberError):
            log.error(
                "invocation %s of %s failed inside Ember",
                self.rid,
                self.key,
                exc_info=(type(error), error, error.__traceback__),
            )
            error = rules.internal(error)
        self.reply(self.fail(error))

    def fail(self, exc: EmberError) -> Response:
        """Answer with the error (recorded when the request reached a function)."""
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        body = _json.encode({"error": rules.error_body(exc, self.rid)})
        self.error = exc.code
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
