"""The CLI's HTTP side: requests built from command-line input, answers turned into errors.

Every failure leaves this module as an `EmberError` whose class (and so exit code) follows the
HTTP status: 4xx → `UserError` (2), 422/502/504 → `FunctionError` (3), 429 → `CapacityError`
(4), other 5xx and an unreachable server → `PlatformError` (5).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Protocol, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from ember.errors import CapacityError, EmberError, FunctionError, PlatformError, UserError

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
UNREACHABLE = "no Ember server at {url}; start one with 'ember up' or set EMBER_URL"


# Errors.


class _ErrorBody(msgspec.Struct, frozen=True):
    message: str
    code: str | None = None
    detail: str | None = None


class _ErrorEnvelope(msgspec.Struct, frozen=True):
    error: _ErrorBody


# 422s that are the caller's input (a function's requirements), not its code failing
_INPUT_422 = frozenset(
    {
        "bad_requirements",
        "requirements_unresolvable",
        "build_failed",
        "build_timeout",
        "build_over_memory",
        "build_over_disk",
        "runtime_conflict",
        "layer_too_large",
        "bad_trigger",  # a trigger's configuration, or its broker unreachable
    }
)


def error_class(status: int, code: str | None = None) -> type[EmberError]:
    """The error class (and so the exit code) for an HTTP status from the server."""
    if status == 422 and code in _INPUT_422:
        return UserError
    if status in (422, 502, 504):
        return FunctionError
    if status == 429:
        return CapacityError
    if 400 <= status < 500:
        return UserError
    return PlatformError


def ember_error(body: bytes) -> tuple[str | None, str, str | None] | None:
    """`(code, message, detail)` when `body` is Ember's JSON error envelope, else None."""
    try:
        err = msgspec.json.decode(body, type=_ErrorEnvelope).error
    except msgspec.DecodeError:
        return None
    return err.code, err.message, err.detail


def error_from_response(status: int, body: bytes) -> EmberError:
    fields = ember_error(body)
    if fields is None:
        text = body.decode("utf-8", "replace").strip()[:500]
        fields = (None, f"server answered HTTP {status}" + (f": {text}" if text else ""), None)
    code, message, detail = fields
    return error_class(status, code)(message, code=code, status=status, detail=detail)


def invoke_exit_code(status: int, body: bytes) -> int:
    """0 below 400; Ember's own errors as for the API; a function's own 4xx → 2, 5xx → 3."""
    if status < 400:
        return 0
    if ember_error(body) is not None:
        return error_class(status).exit_code
    return UserError.exit_code if status < 500 else FunctionError.exit_code


def decode(raw: bytes | str, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.DecodeError as exc:
        raise PlatformError(
            f"unexpected answer from the Ember server ({exc}); is the CLI as new as the server?",
            code="bad_response",
        ) from None


# Building requests from command-line input: pure, tested in tests/unit/test_cli_parsing.py.


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """'250ms', '30s', '10m', '1h30m', '2d' → seconds."""
    text = text.strip()
    parts = list(_DURATION_PART.finditer(text))
    if not parts or "".join(part.group(0) for part in parts) != text:
        raise UserError(
            f"duration {text!r} is not valid; use numbers with ms, s, m, h or d, e.g. 10m or 1h30m",
            code="bad_duration",
        )
    return sum(float(part.group(1)) * _UNITS[part.group(2)] for part in parts)


_ALIAS = re.compile(r"([a-z][a-z0-9-]*)=(\d+)(?::(\d+))?")


def parse_alias(text: str) -> dict[str, int | str]:
    """'stable=3:90' → alias stable, revision 3, weight 90; 'stable=3' → weight 0."""
    found = _ALIAS.fullmatch(text.strip())
    if found is None:
        raise UserError(
            f"{text!r} is not ALIAS=REVISION[:WEIGHT]; write e.g. stable=3:90 canary=4:10",
            code="bad_alias",
        )
    name, revision, weight = found.groups()
    return {"name": name, "revision": int(revision), "weight": int(weight or 0)}


def parse_percent(text: str, what: str) -> float:
    """'1%' or '0.01' → 0.01."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise UserError(
            f"{what} {text!r} is not a share; write a percentage like 1% or a fraction like 0.01",
            code="bad_percent",
        )
    return value


def parse_since(text: str, now: float) -> float:
    """A duration back from `now`, or a unix timestamp (a plain number above 1e9)."""
    try:
        number = float(text)
    except ValueError:
        return now - parse_duration(text)
    if math.isfinite(number) and number > 1e9:
        return number
    raise UserError(
        f"--since {text!r} is neither a duration (30s, 10m, 2h) nor a unix timestamp (above 1e9)",
        code="bad_since",
    )


def parse_data(value: str | None, stdin: IO[bytes]) -> bytes | None:
    """--data: a literal string, '@FILE' for a file's bytes, or '@-' for standard input."""
    if value is None:
        return None
    if value == "@-":
        return stdin.read()
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            return path.read_bytes()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UserError(
                f"cannot read --data file '{path}': {reason}; give an existing file after '@'",
                code="bad_data",
            ) from None
    return value.encode()


def default_name(directory: Path) -> str:
    """The function name a directory deploys as: its basename, lowercased, '_'/' ' → '-'."""
    return re.sub(r"[_ ]", "-", directory.resolve().name.lower())


def log_params(since: str | None, follow: bool, limit: int | None, now: float) -> dict[str, str]:
    params = {"follow": "true" if follow else "false"}
    if since is not None:
        params["since"] = repr(parse_since(since, now))
    if limit is not None:
        params["limit"] = str(limit)
    return params


def parse_header(text: str) -> tuple[str, str]:
    """-H 'Name: value' → ('Name', 'value')."""
    name, colon, value = text.partition(":")
    name = name.strip()
    if not colon or not name or any(char.isspace() for char in name):
        raise UserError(f"header {text!r} must look like 'Name: value'", code="bad_header")
    return name, value.strip()


def choose_method(method: str | None, has_body: bool) -> str:
    if method is None:
        return "POST" if has_body else "GET"
    if not method.isalpha():
        raise UserError(f"--method {method!r} is not an HTTP method like GET or POST")
    return method.upper()


def function_path(
    name: str, sub: str = "", namespace: str = "default", *, queued: bool = False
) -> str:
    """/fn/[NAMESPACE/]NAME plus a sub-path (and query), with a '/' added when it lacks one;
    `queued`: the same under /fn-async/, which queues the call instead."""
    if sub and sub[0] not in "/?":
        sub = "/" + sub
    prefix = "" if namespace == "default" else f"{quote(namespace, safe='')}/"
    return f"/fn{'-async' if queued else ''}/{prefix}{quote(name, safe='')}{sub}"


def api_path(name: str, *rest: str) -> str:
    return "/".join(("/api/v1/functions", quote(name, safe=""), *rest))


def invocation_path(invocation_id: str, *rest: str) -> str:
    return "/".join(("/api/v1/invocations", quote(invocation_id, safe=""), *rest))


# Waiting for an async invocation to end: pure (the poll, clock and sleep are given), tested in
# tests/unit/test_cli_async.py.

ENDED = ("succeeded", "failed", "dead", "expired", "cancelled")
FIRST_POLL = 0.02  # seconds before the second poll; doubled each time, up to LONGEST_POLL
LONGEST_POLL = 1.0


class WaitTimeout(EmberError):
    """`--wait --timeout S` ran out before the invocation ended (exit code 4)."""

    code = "wait_timeout"
    exit_code = 4


class _Polled(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def status(self) -> str: ...


PolledT = TypeVar("PolledT", bound=_Polled)


def wait_for_end(
    poll: Callable[[], PolledT],
    timeout: float | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> PolledT:
    """Poll until the invocation's status is one of `ENDED` and return that last answer; the
    pause starts at 20 ms and doubles up to 1 s. Past `timeout` seconds (None: no limit),
    `WaitTimeout`."""
    deadline = None if timeout is None else clock() + timeout
    pause = FIRST_POLL
    while True:
        polled = poll()
        if polled.status in ENDED:
            return polled
        now = clock()
        if deadline is not None and now >= deadline:
            raise WaitTimeout(
                f"invocation {polled.id} is still {polled.status} after {timeout:g}s; "
                f"'ember invocations get {polled.id} --wait' waits again"
            )
        sleep(pause if deadline is None else min(pause, deadline - now))
        pause = min(pause * 2, LONGEST_POLL)


def wait_exit_code(status: str) -> int:
    """How `--wait` ends: 0 succeeded, 3 failed/dead/expired, 1 cancelled."""
    if status == "succeeded":
        return 0
    if status == "cancelled":
        return 1
    return FunctionError.exit_code


def not_found_hint(exc: EmberError, invocation_id: str) -> EmberError:
    """A 404 for a shortened id (tables show 8 characters) says where the full one is."""
    if exc.status == 404 and len(invocation_id) < 32:
        exc.message += (
            f" ({invocation_id!r} is shorter than an invocation id, 32 hex characters; "
            "'ember invocations NAME --json' lists the full ones)"
        )
    return exc


# The client.


class Client:
    """One connection pool to one Ember server; every failure surfaces as an `EmberError`."""

    def __init__(
        self, base_url: str, *, timeout: float | None = DEFAULT_TIMEOUT, key: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
            headers=headers,
            # Loading the CA store costs each command ~40 ms; plain HTTP (it follows no
            # redirect) never uses it. An https:// server is verified as always.
            verify=not self.base_url.startswith("http://"),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        json: object = None,
        headers: Sequence[tuple[str, str]] = (),
        with_key: bool = True,
    ) -> httpx.Response:
        """Send one request and return the response whatever its status."""
        own = any(name.lower() == "authorization" for name, _ in headers)
        with self._transport_errors():
            request = self._http.build_request(
                method, path, params=params, content=content, json=json, headers=list(headers)
            )
            if not with_key and not own:
                request.headers.pop("Authorization", None)
            return self._http.send(request)

    def invoke(
        self, method: str, path: str, *, content: bytes | None, headers: Sequence[tuple[str, str]]
    ) -> httpx.Response:
        """Call a function: first without our key (a public function's code must never see
        it); again with it when Ember itself says the function needs one. The marker is an
        `X-Ember-*` header, which a function's own response can never carry."""
        resp = self.request(method, path, content=content, headers=headers, with_key=False)
        if resp.status_code == 401 and self.key and resp.headers.get("x-ember-auth") == "required":
            resp = self.request(method, path, content=content, headers=headers)
        return resp

    def invoke_async(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None,
        headers: Sequence[tuple[str, str]],
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[bytes, str]:
        """Queue a call (`path` under /fn-async/): the accept body (`{"id", "status"}`) and its
        Location; any error status raises."""
        extra = [("X-Callback-Url", callback_url)] if callback_url else []
        extra += [("Idempotency-Key", idempotency_key)] if idempotency_key else []
        resp = self.invoke(method, path, content=content, headers=[*headers, *extra])
        if resp.is_error:
            raise error_from_response(resp.status_code, resp.content)
        return resp.content, resp.headers.get("location", "")

    # Async invocations and the dead-letter queue: each answers the server's JSON as bytes.

    def invocation(self, invocation_id: str) -> bytes:
        return self._about(invocation_id, "GET", invocation_path(invocation_id))

    def cancel_invocation(self, invocation_id: str) -> bytes:
        return self._about(invocation_id, "DELETE", invocation_path(invocation_id))

    def replay_invocation(self, invocation_id: str) -> bytes:
        return self._about(invocation_id, "POST", invocation_path(invocation_id, "replay"))

    def invocations(self, name: str, namespace: str, status: str | None, limit: int) -> bytes:
        params = {"namespace": namespace, "limit": str(limit)}
        if status:
            params["status"] = status
        return self.fetch("GET", api_path(name, "invocations"), params=params)

    def dead_letters(self, name: str, namespace: str, limit: int) -> bytes:
        params = {"namespace": namespace, "limit": str(limit)}
        return self.fetch("GET", api_path(name, "dlq"), params=params)

    def replay_dead_letters(self, name: str, namespace: str) -> bytes:
        params = {"namespace": namespace}
        return self.fetch(
            "POST", api_path(name, "dlq", "replay"), params=params, json={"all": True}
        )

    def purge_dead_letters(self, name: str, namespace: str) -> bytes:
        return self.fetch("DELETE", api_path(name, "dlq"), params={"namespace": namespace})

    # Triggers (ember.cli.triggers): each answers the server's JSON as bytes.

    def triggers(self, name: str | None, namespace: str | None) -> bytes:
        """A function's triggers, or (no `name`) those of every function the key may read."""
        params = {"namespace": namespace} if namespace else None
        path = api_path(name, "triggers") if name is not None else "/api/v1/triggers"
        return self.fetch("GET", path, params=params)

    def add_trigger(
        self, name: str, namespace: str, trigger: Mapping[str, object], allow_errors: bool
    ) -> bytes:
        # msgspec, not httpx's json: a YAML file may hold dates, which it writes as RFC 3339
        body = msgspec.json.encode({"trigger": trigger, "allow_errors": allow_errors})
        return self.fetch(
            "POST",
            api_path(name, "triggers"),
            params={"namespace": namespace},
            content=body,
            headers=[("Content-Type", "application/json")],
        )

    def remove_trigger(self, name: str, namespace: str, trigger: str) -> bytes:
        path = api_path(name, "triggers", quote(trigger, safe=""))
        return self.fetch("DELETE", path, params={"namespace": namespace})

    def trigger_action(self, name: str, namespace: str, trigger: str, action: str) -> bytes:
        """`action` is pause or resume."""
        path = api_path(name, "triggers", quote(trigger, safe=""), action)
        return self.fetch("POST", path, params={"namespace": namespace})

    def _about(self, invocation_id: str, method: str, path: str) -> bytes:
        try:
            return self.fetch(method, path)
        except EmberError as exc:
            raise not_found_hint(exc, invocation_id) from None

    def fetch(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        json: object = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> bytes:
        """The body of a successful answer; an error status raises the matching `EmberError`."""
        resp = self.request(
            method, path, params=params, content=content, json=json, headers=headers
        )
        if resp.is_error:
            raise error_from_response(resp.status_code, resp.content)
        return resp.content

    @contextmanager
    def stream_lines(
        self,
        path: str,
        *,
        params: Mapping[str, str],
        method: str = "GET",
        content: bytes | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Iterator[Iterator[str]]:
        """Send a request and yield an iterator over the lines of the body as they arrive."""
        with (
            self._transport_errors(),
            self._http.stream(
                method, path, params=params, content=content, headers=list(headers)
            ) as resp,
        ):
            if resp.is_error:
                resp.read()
                raise error_from_response(resp.status_code, resp.content)
            yield resp.iter_lines()

    @contextmanager
    def _transport_errors(self) -> Iterator[None]:
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise PlatformError(UNREACHABLE.format(url=self.base_url), code="unreachable") from None
        except httpx.TimeoutException as exc:
            kind = type(exc).__name__
            raise PlatformError(
                f"the Ember server at {self.base_url} did not answer in time ({kind})",
                code="timeout",
            ) from None
        except httpx.HTTPError as exc:
            raise PlatformError(
                f"talking to the Ember server at {self.base_url} failed: {exc}", code="transport"
            ) from None


def probe(base_url: str, timeout: float = 1.0) -> tuple[bool, str]:
    """Whether anything answers GET /healthz at `base_url`, and what it said."""
    try:
        resp = httpx.get(f"{base_url.rstrip('/')}/healthz", timeout=timeout)
    except httpx.HTTPError as exc:
        return False, UNREACHABLE.format(url=base_url) + f" ({type(exc).__name__})"
    return True, f"{base_url} answers /healthz with HTTP {resp.status_code}"
