"""Webhook triggers: signed HTTP requests to `POST /hooks/{trigger-id}`, each one an event.

There is no broker: the sender is the queue. The API route calls `receive`, which checks the
HMAC-SHA256 signature, hands the event over and answers only once Ember acked it (202) or nacked
it (503, so the sender retries). Running webhook sources are found by trigger id in a registry
that `start` and `stop` keep; a stopped or paused trigger answers 404.

Signatures (`signature:`):
- `github`: `X-Hub-Signature-256: sha256=<hex HMAC of the body>`. GitHub signs no timestamp,
  so there is no replay window; `X-GitHub-Delivery` becomes the event id, stable across
  GitHub's redeliveries, for the function to deduplicate.
- `ember` (default): `X-Ember-Timestamp: <unix seconds>` and
  `X-Ember-Signature: v1=<hex HMAC of "<timestamp>.<body>">` (several comma-separated `v1=`
  entries are allowed, to rotate secrets). A timestamp more than `tolerance` seconds from now is
  refused (401); a signature already accepted within the window is a replay (409). A nacked
  request's signature is forgotten, so the sender may retry the very same request.

A request that is itself a CloudEvent (binary mode `ce-*` headers, or structured mode
`application/cloudevents+json`) keeps its attributes; a batch is delivered as one event.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from ember.triggers import envelope
from ember.triggers.base import (
    Event,
    Events,
    Message,
    TriggerError,
    int_field,
    only,
)

SIGNATURES = ("ember", "github")
MIN_SECRET = 16
STRUCTURED = "application/cloudevents+json"
HMAC = "hex HMAC-SHA256, keyed with the trigger's secret,"

_running: dict[str, Webhook] = {}  # trigger id -> its started source


async def receive(
    trigger_id: str, headers: Mapping[str, str], body: bytes, now: float
) -> tuple[int, dict[str, str]]:
    """Answer `POST /hooks/{trigger_id}`: `headers` with lower-case names, `now` unix seconds.
    Returns the HTTP status and a JSON body."""
    hook = _running.get(trigger_id)
    if hook is None:
        return 404, {"error": f"no running webhook trigger {trigger_id!r}; see `ember triggers ls`"}
    return await hook.receive(headers, body, now)


class Refused(Exception):
    """A request answered without an event: `status` and what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Seen:
    """Signatures accepted recently, each kept until its timestamp leaves the window."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []  # a heap: the first to expire on top

    def __len__(self) -> int:
        return len(self._until)

    def add(self, signature: str, until: float, now: float) -> bool:
        """Remember `signature` until `until`; False if it is remembered already (a replay)."""
        while self._expiry and self._expiry[0][0] < now:
            expires, old = heapq.heappop(self._expiry)
            if self._until.get(old) == expires:
                del self._until[old]
        if signature in self._until:
            return False
        self._until[signature] = until
        heapq.heappush(self._expiry, (until, signature))
        return True

    def discard(self, signature: str) -> None:
        self._until.pop(signature, None)


class Webhook:
    """A passive source: events arrive through `receive`."""

    type: ClassVar[str] = "webhook"
    durable: ClassVar[bool] = True

    @classmethod
    def validate(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        only(config, ("secret", "signature", "type", "tolerance"))
        secret = config.get("secret")
        if secret is None:
            raise TriggerError(
                "secret",
                "is required: webhooks are verified with HMAC-SHA256; set `secret:` to a random "
                f"string of at least {MIN_SECRET} characters and give the sender the same",
            )
        if not isinstance(secret, str) or len(secret) < MIN_SECRET:
            length = len(secret) if isinstance(secret, str) else type(secret).__name__
            raise TriggerError(
                "secret",
                f"must be a string of at least {MIN_SECRET} characters (got {length}); "
                "generate one with `openssl rand -hex 32`",
            )
        signature = config.get("signature", "ember")
        if signature not in SIGNATURES:
            raise TriggerError("signature", f"must be ember or github, not {signature!r}")
        if signature == "github" and "tolerance" in config:
            raise TriggerError(
                "tolerance", "applies to signature: ember only (GitHub signs no time)"
            )
        tolerance = int_field(config, "tolerance", 300, 1, 86400)
        kind = config.get("type", "" if signature == "github" else "io.ember.webhook")
        if not isinstance(kind, str) or (not kind and "type" in config):
            raise TriggerError("type", f"must be a non-empty CloudEvents type, not {kind!r}")
        return {"secret": secret, "signature": signature, "type": kind, "tolerance": tolerance}

    def __init__(self, config: dict[str, Any], events: Events) -> None:
        self.events = events
        self.signature: str = config.get("signature", "ember")
        self.tolerance: int = config.get("tolerance", 300)
        self.kind: str = config.get("type", "")
        self._secret = str(config["secret"]).encode()
        self._seen = Seen()
        self._pending: set[asyncio.Future[bool]] = set()

    async def check(self) -> None:
        """Nothing to reach: senders come to Ember."""

    async def start(self) -> None:
        _running[self.events.id] = self
        self.events.connected()

    async def stop(self) -> None:
        """Leave the registry; requests still waiting for their ack get 503."""
        if _running.get(self.events.id) is self:
            del _running[self.events.id]
        for waiting in self._pending:
            if not waiting.done():
                waiting.set_result(False)

    async def ack(self, message: Message) -> None:
        _settle(message.token, True)

    async def nack(self, message: Message) -> None:
        _settle(message.token, False)

    async def receive(
        self, headers: Mapping[str, str], body: bytes, now: float
    ) -> tuple[int, dict[str, str]]:
        """Verify, hand the event over, and answer once it is acked or nacked."""
        try:
            signature, until = self._verify(headers, body, now)
            event = self._event(headers, body, now)
            if signature and not self._seen.add(signature, until, now):
                raise Refused(409, "this request was received already (same X-Ember-Signature)")
        except Refused as refused:
            return refused.status, {"error": refused.message}
        delivered = False
        try:
            delivered = await self._deliver(event)
        finally:
            if not delivered and signature:
                self._seen.discard(signature)  # the sender may retry the same request
        if delivered:
            return 202, {"id": event.id, "status": "delivered"}
        return 503, {
            "id": event.id,
            "status": "not delivered",
            "error": "the event could not be delivered now; retry later",
        }

    async def _deliver(self, event: Event) -> bool:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.add(done)
        message = Message(event, done, event.subject or self.events.id)
        putting = asyncio.create_task(self.events.put(message))
        putting.add_done_callback(lambda task: _settle(done, False) if _failed(task) else None)
        try:
            return await done
        finally:
            self._pending.discard(done)
            putting.cancel()  # still waiting for room only if the trigger stopped

    def _verify(self, headers: Mapping[str, str], body: bytes, now: float) -> tuple[str, float]:
        """Check the signature; returns what identifies a replay ("" for GitHub) and until when
        it must be remembered."""
        if self.signature == "github":
            sent = _header(headers, "X-Hub-Signature-256", f"sha256=<{HMAC} of the body>")
            expected = "sha256=" + self._hmac(body)
            if not hmac.compare_digest(sent.strip().lower().encode(), expected.encode()):
                raise Refused(401, "X-Hub-Signature-256 does not match the body and the secret")
            return "", 0.0
        stamp = _header(headers, "X-Ember-Timestamp", "the unix time in seconds it was signed at")
        try:
            skew = abs(now - int(stamp))
        except ValueError:
            raise Refused(401, f"X-Ember-Timestamp {stamp!r} is not unix seconds") from None
        if skew > self.tolerance:
            raise Refused(
                401,
                f"X-Ember-Timestamp {stamp} is {skew:.0f} s from the server's time (tolerance "
                f"{self.tolerance} s): sign each request as it is sent, and check the clock",
            )
        sent = _header(headers, "X-Ember-Signature", f'v1=<{HMAC} of "<timestamp>.<body>">')
        expected = self._hmac(stamp.encode() + b"." + body)
        offered = [part.strip().lower().removeprefix("v1=") for part in sent.split(",")]
        if not any(hmac.compare_digest(one.encode(), expected.encode()) for one in offered):
            raise Refused(401, "X-Ember-Signature does not match the timestamp, body and secret")
        return expected, int(stamp) + self.tolerance

    def _hmac(self, payload: bytes) -> str:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest()

    def _event(self, headers: Mapping[str, str], body: bytes, now: float) -> Event:
        content_type = headers.get("content-type", "")
        if "ce-specversion" in headers or content_type.startswith(STRUCTURED):
            return _cloudevent(headers, body, now)
        if self.signature == "github":
            given = headers.get("x-github-delivery", "")
            kind = self.kind or f"com.github.{headers.get('x-github-event', 'unknown')}"
        else:
            given, kind = headers.get("x-ember-id", ""), self.kind
        return Event(
            id=given or uuid.uuid4().hex,
            source=f"ember://webhook/{self.events.id}",
            type=kind,
            time=_time(datetime.fromtimestamp(now, UTC), "milliseconds"),
            datacontenttype=content_type,
            data=body,
        )


def _cloudevent(headers: Mapping[str, str], body: bytes, now: float) -> Event:
    """An incoming CloudEvent (binary or structured mode), its attributes kept."""
    pairs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    try:
        events = envelope.from_http(pairs, body)
    except ValueError as exc:  # what the parser rejects is the sender's mistake
        raise Refused(400, f"the request is not a valid CloudEvent: {exc}") from None
    if len(events) != 1:
        raise Refused(400, "send one CloudEvent per request; a batch is not taken here")
    event = events[0]
    if not event.time:
        event.time = _time(datetime.fromtimestamp(now, UTC))
    return event


def _time(when: datetime, precision: str = "auto") -> str:
    return when.astimezone(UTC).isoformat(timespec=precision).replace("+00:00", "Z")


def _header(headers: Mapping[str, str], name: str, what: str) -> str:
    value = headers.get(name.lower(), "")
    if not value:
        raise Refused(401, f"missing {name} header: it must hold {what}")
    return value


def _failed(task: asyncio.Task[None]) -> bool:
    return task.cancelled() or task.exception() is not None


def _settle(token: object, delivered: bool) -> None:
    if isinstance(token, asyncio.Future) and not token.done():
        token.set_result(delivered)
