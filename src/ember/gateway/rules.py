"""What the gateway reads from a request and answers for it, as pure functions: the target a
request reaches (alias, weighted split), its headers (one looked up, Ember's key taken out, a
function's own checked), its deadline, request ids and the errors it may get."""

from __future__ import annotations

import math
import os

from ember.errors import (
    EmberError,
    FunctionError,
    FunctionMemoryExceeded,
    NotFound,
    PlatformError,
    TooLarge,
    UserError,
)
from ember.gateway.router import Route
from ember.pool.target import Target
from ember.runtime.convert import BAD_HEADER_VALUE, HEADER_TOKEN, RESERVED_HEADERS
from ember.wire.messages import Headers, Result

PREFIX = "/fn/"


def function_headers(headers: Headers, target: Target) -> Headers:
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


def no_function(key: str, name: str) -> NotFound:
    where = "" if key.startswith("default/") else f" in namespace '{key.split('/')[0]}'"
    return NotFound(
        f"no function named '{name}'{where}; deploy it with `ember deploy` "
        "or list functions with `ember ls`"
    )


def raw_rest(path: str, raw_path: bytes, rest: str) -> str:
    """The path after /fn/[NAMESPACE/]NAME as sent (percent-encoding kept), for `req.raw_path`."""
    after = path[len(PREFIX) :]
    taken = after[: len(after) - len(rest)].rstrip("/").count("/") + 3  # "", "fn", the name
    parts = (raw_path or path.encode()).split(b"/", taken)
    return "/" + (parts[taken].decode("latin-1") if len(parts) > taken else "")


def private(route: Route, target: Target) -> bool:
    """A function is as private as its serving revision: an alias of an older, public
    revision (or a canary) does not open it to callers without a key."""
    return target.spec.access == "private" or route.main.spec.access == "private"


def header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def without_authorization(headers: Headers) -> Headers:
    return [(k, v) for k, v in headers if k != b"authorization"]


def choose(route: Route, alias: str, sticky: bytes, name: str) -> tuple[Target, str]:
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


def timeout(raw: bytes | None, target: Target) -> float:
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


def internal(exc: BaseException) -> PlatformError:
    return PlatformError(
        f"Ember failed while handling this request ({type(exc).__name__}); see the server log",
        code="internal",
        status=500,
    )


def error_body(exc: EmberError, rid: str) -> dict[str, str]:
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


def too_large(size: int, limit: int, queued: bool = False) -> TooLarge:
    what = "an async invocation's limit" if queued else "limit"
    where = " (ember up --async-max-body-mb)" if queued else ""
    return TooLarge(
        f"request body of {size} bytes exceeds the {limit / (1024 * 1024):g} MB {what}"
        f"{where}; send large payloads by reference (e.g. a URL)",
        code="body_too_large",
    )


def memory_error(target: Target, result: Result) -> FunctionMemoryExceeded:
    return FunctionMemoryExceeded(
        f"function '{target.function}' exceeded its memory limit of {target.spec.memory} MB "
        f"(peak {result.max_rss_kb // 1024} MB RSS) and its instance was stopped; "
        "raise memory: in ember.yaml"
    )
