"""Turn what a handler returns, or raises, into a wire `Result`."""

from __future__ import annotations

import re

import msgspec

from ember.runtime.api import Response
from ember.runtime.stack import format_exception
from ember.wire.messages import ErrorInfo, Headers, Result

_json = msgspec.json.Encoder()
JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
BINARY = b"application/octet-stream"


class BadReturn(TypeError):
    pass


def _body(value: object, content_type: str | None) -> tuple[bytes, bytes]:
    if isinstance(value, bytes | bytearray | memoryview):
        body, kind = bytes(value), BINARY
    elif isinstance(value, str):
        body, kind = value.encode(), TEXT
    elif value is None:
        body, kind = b"", TEXT
    else:
        try:
            body, kind = _json.encode(value), JSON
        except (TypeError, msgspec.EncodeError) as exc:
            raise BadReturn(
                f"the handler returned a {type(value).__name__} that is not JSON-serialisable "
                f"({exc}); return a dict, list, str, bytes, a (body, status) tuple or "
                "ember.Response"
            ) from None
    if content_type:
        pair = _header("content-type", content_type)
        assert pair is not None
        return body, pair[1]
    return body, kind


# Framing belongs to the server; ours identify the invocation. A function may not set them.
RESERVED_HEADERS = {
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"keep-alive",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-authenticate",
    b"proxy-authorization",
}
HEADER_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9a-z-]+$")
BAD_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but tab


def _header(key: object, value: object) -> tuple[bytes, bytes] | None:
    name = str(key).lower().encode("latin-1", "replace")
    data = str(value).encode("latin-1", "replace")
    if not HEADER_TOKEN.match(name):
        raise BadReturn(f"response header name {str(key)[:40]!r} is not a valid HTTP token")
    if BAD_HEADER_VALUE.search(data):
        raise BadReturn(f"response header {str(key)[:40]!r} has a CR, LF or NUL in its value")
    if name in RESERVED_HEADERS or name.startswith(b"x-ember-"):
        return None  # dropped: the server sets these
    return name, data


def _headers(extra: object, content_type: bytes) -> Headers:
    out: Headers = [(b"content-type", content_type)]
    if isinstance(extra, dict):
        for k, v in extra.items():
            pair = _header(k, v)
            if pair is None:
                continue
            if pair[0] == b"content-type":
                out[0] = pair
            else:
                out.append(pair)
    elif extra is not None:
        raise BadReturn("response headers must be a dict of str to str")
    return out


def to_result(request_id: str, value: object) -> Result:
    status, extra, ctype = 200, None, None
    if isinstance(value, Response):
        status, extra, ctype, value = value.status, value.headers, value.content_type, value.body
    elif isinstance(value, tuple):
        if not 2 <= len(value) <= 3 or not isinstance(value[1], int):
            raise BadReturn("a tuple return must be (body, status) or (body, status, headers)")
        status, extra = value[1], (value[2] if len(value) == 3 else None)
        value = value[0]
    if not 200 <= status <= 599:
        raise BadReturn(f"status {status} is not a final HTTP status code (200-599)")
    body, kind = _body(value, ctype)
    if value is None and status == 200:
        status = 204
    if status in (204, 304):
        body = b""  # these responses have no body by definition
    return Result(id=request_id, status=status, headers=_headers(extra, kind), body=body)


def error_result(request_id: str, exc: BaseException, *, kind: str = "exception") -> Result:
    stack = format_exception(exc)
    info = ErrorInfo(error_type=type(exc).__name__, message=str(exc), stack_trace=stack, kind=kind)
    body = _json.encode(
        {
            "errorType": info.error_type,
            "errorMessage": info.message,
            "stackTrace": stack,
            "requestId": request_id,
        }
    )
    return Result(
        id=request_id, status=500, headers=[(b"content-type", JSON)], body=body, error=info
    )


def too_large(request_id: str, size: int, limit: int) -> Result:
    """The handler's response could not be sent: 502 naming the limit."""
    mib = 1024 * 1024
    message = (
        f"the function's response of {size / mib:.1f} MiB exceeds the {limit // mib} MiB "
        "limit of one response; return large payloads by reference (e.g. a URL to them)"
    )
    info = ErrorInfo(error_type="ResponseTooLarge", message=message, stack_trace=[])
    body = _json.encode(
        {"errorType": info.error_type, "errorMessage": message, "requestId": request_id}
    )
    return Result(
        id=request_id, status=502, headers=[(b"content-type", JSON)], body=body, error=info
    )
