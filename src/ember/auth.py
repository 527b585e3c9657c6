"""API keys, scopes and per-key rate limits. Pure: no I/O; the control plane persists keys and
pushes them here, the API and the gateway ask.

A key reads ``ember_<id>_<secret>``: `id` (8 hex digits) names it in listings and in the store;
`secret` (32 random bytes, base64url) is never stored, only its SHA-256 digest. A fast hash is
the right one for 256-bit random secrets (there is nothing to brute-force); digests are compared
with `hmac.compare_digest`.

Scopes: ``admin`` (everything, including keys, quotas and every namespace), ``deploy:NS``
(deploy, scale, delete and set secrets in NS; implies ``read:NS``), ``invoke:NS`` (call private
functions of NS), ``read:NS`` (list, describe, logs, activations). NS may be ``*``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Iterable

import msgspec

from ember.errors import Forbidden, RateLimited, Unauthorized, UserError

ACTIONS = ("deploy", "invoke", "read")
_SCOPE_RE = re.compile(r"^(admin|(deploy|invoke|read):(\*|[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?))\Z")
_TOKEN_RE = re.compile(r"^ember_([0-9a-f]{8})_([A-Za-z0-9_-]{43})\Z")
SCOPE_RULE = "use admin, or deploy:NS, invoke:NS or read:NS with a namespace name or *"


def validate_scopes(scopes: Iterable[str]) -> list[str]:
    out = sorted(set(scopes))
    if not out:
        raise UserError(f"a key needs at least one scope; {SCOPE_RULE}", code="bad_scope")
    for scope in out:
        if not _SCOPE_RE.match(scope):
            raise UserError(f"scope {scope[:80]!r} is invalid; {SCOPE_RULE}", code="bad_scope")
    return out


def new_token() -> tuple[str, str, bytes]:
    """A fresh key: (id, the whole token to show once, the digest to store)."""
    key_id = secrets.token_hex(4)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return key_id, f"ember_{key_id}_{secret}", digest(secret)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def is_ember_token(authorization: bytes) -> bool:
    """An `Authorization` value that may carry an Ember key (which no function may see)."""
    return b"ember_" in authorization.lower()


def parse_token(token: str) -> tuple[str, str] | None:
    match = _TOKEN_RE.match(token)
    return (match[1], match[2]) if match else None


class TokenBucket:
    """`rate` tokens per second up to `burst`; each request takes one."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()

    def take(self, now: float) -> float:
        """0 when a token was taken; else the seconds until one will be there."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Key(msgspec.Struct, frozen=True):
    id: str
    digest: bytes
    name: str
    scopes: list[str]
    rate: float = 0.0  # requests per second; 0 = unlimited
    burst: int = 0


class Principal:
    """A verified key: what it may do, and its bucket."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.bucket = TokenBucket(key.rate, key.burst or math.ceil(key.rate)) if key.rate else None

    @property
    def admin(self) -> bool:
        return "admin" in self.key.scopes

    def allows(self, action: str, namespace: str) -> bool:
        if self.admin:
            return True
        actions = (action, "deploy") if action == "read" else (action,)
        return any(f"{a}:{ns}" in self.key.scopes for a in actions for ns in (namespace, "*"))

    def namespaces(self, action: str) -> set[str] | None:
        """Namespaces the key may `action` in; None = all of them."""
        if self.admin:
            return None
        actions = {action, "deploy"} if action == "read" else {action}
        found = {s.partition(":")[2] for s in self.key.scopes if s.partition(":")[0] in actions}
        return None if "*" in found else found


class KeyTable:
    """The keys the server knows, by id. Replaced whole by the control plane on every change;
    buckets survive a replacement for keys that stay."""

    def __init__(self) -> None:
        self._by_id: dict[str, Principal] = {}

    def replace(self, keys: Iterable[Key]) -> None:
        fresh: dict[str, Principal] = {}
        for key in keys:
            old = self._by_id.get(key.id)
            fresh[key.id] = old if old is not None and old.key == key else Principal(key)
        self._by_id = fresh

    def __len__(self) -> int:
        return len(self._by_id)

    def active(self, key_id: str) -> bool:
        return key_id in self._by_id

    def verify(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <key>` header, or 401."""
        if not authorization:
            raise Unauthorized(
                "this call needs an API key: send Authorization: Bearer <key>; the admin key "
                "is in EMBER_HOME/credentials, `ember keys create` makes others",
                headers={"WWW-Authenticate": "Bearer", "X-Ember-Auth": "required"},
            )
        scheme, _, token = authorization.strip().partition(" ")
        parsed = parse_token(token.strip()) if scheme.lower() == "bearer" else None
        principal = self._by_id.get(parsed[0]) if parsed else None
        # Compared in constant time even for unknown ids, so timing tells nothing.
        expected = principal.key.digest if principal is not None else bytes(32)
        given = digest(parsed[1]) if parsed else b""
        if not hmac.compare_digest(expected, given) or principal is None:
            raise Unauthorized(
                "the API key is unknown, revoked or malformed; keys look like "
                "ember_<8 hex>_<43 characters>",
                headers={
                    "WWW-Authenticate": 'Bearer error="invalid_token"',
                    "X-Ember-Auth": "required",
                },
            )
        return principal

    @staticmethod
    def require(principal: Principal, action: str, namespace: str) -> None:
        if not principal.allows(action, namespace):
            have = ", ".join(principal.key.scopes)
            raise Forbidden(
                f"key {principal.key.id} ({have}) may not {action} in namespace '{namespace}'; "
                f"it needs scope {action}:{namespace} or admin"
            )

    @staticmethod
    def throttle(principal: Principal, now: float) -> None:
        if principal.bucket is None:
            return
        wait = min(principal.bucket.take(now), 3600.0)
        if wait > 0:
            raise RateLimited(
                f"key {principal.key.id} is over its rate limit of "
                f"{principal.key.rate:g} requests/s (burst {principal.bucket.burst}); "
                f"retry in {wait:.2f} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
