"""Request parsing for `/api/v1`: JSON bodies and query parameters, exactly as the OpenAPI
document describes them (openapi.py); anything else is a 400 naming the parameter."""

from __future__ import annotations

import math
import re
import sys
from typing import Any

import msgspec
from starlette.requests import Request

from ember.api import schemas as s
from ember.api.openapi import INT64_MAX
from ember.errors import TooLarge, UserError

MAX_JSON_BYTES = 1024 * 1024  # a JSON body of the control plane


async def body(request: Request, kind: type[Any]) -> Any:
    media = request.headers.get("content-type")
    if media is not None and media.partition(";")[0].strip().lower() != "application/json":
        raise UserError(
            f"the body is JSON; send it as Content-Type: application/json, not {media[:60]!r}",
            code="unsupported_media_type",
            status=415,
        )
    raw = bytearray()
    async for chunk in request.stream():  # never more than the cap in memory
        raw += chunk
        if len(raw) > MAX_JSON_BYTES:
            raise TooLarge(
                f"the JSON body exceeds {MAX_JSON_BYTES // 1024} KB; the control plane's "
                "bodies are small settings (bundles go to /api/v1/deploy)",
                code="body_too_large",
            )
    try:
        return msgspec.convert(_whole_numbers(msgspec.json.decode(raw), "$"), type=kind)
    except msgspec.ValidationError as exc:
        raise UserError(f"invalid request body: {exc}", code="bad_request") from None
    except msgspec.DecodeError as exc:
        raise UserError(f"request body is not valid JSON: {exc}", code="bad_request") from None


def _whole_numbers(value: Any, where: str) -> Any:
    """JSON has one number type, so `3.0` is the integer 3 (as JSON Schema, and so the OpenAPI
    document, has it); msgspec's integers refuse it. Integers beyond SQLite's INTEGER are
    refused here: every integer field of a request is documented within them."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is int and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise UserError(
            f"invalid request body: {where}={value} is out of range (at most {INT64_MAX})",
            code="bad_request",
        )
    if isinstance(value, list):
        return [_whole_numbers(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {key: _whole_numbers(item, f"{where}.{key}") for key, item in value.items()}
    return value


def canary_plan(request: Request) -> s.CanaryPlan | None:
    """`?canary=10&step=10&every=60&max_error_rate=0.01&max_p99_ms=500` of a deploy."""
    if "canary" not in request.query_params:
        return None
    return s.CanaryPlan(
        percent=integer(request, "canary", 10, 1, 99),
        step=integer(request, "step", 10, 1, 100),
        every=number(request, "every", 60.0, 1.0, 86_400.0),
        max_error_rate=number(request, "max_error_rate", 0.01, 0.0, 1.0),
        max_p99_ms=number(request, "max_p99_ms", 0.0, 0.0, 3_600_000.0),
    )


JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")


def number(
    request: Request, key: str, default: float, low: float, high: float, what: str = ""
) -> float:
    """A query parameter documented as a number: JSON's syntax (Python's `float()` would also
    take `1_0`, ` 1`, `nan` or `infinity`), within [low, high]."""
    raw = request.query_params.get(key)
    if raw is None:
        return default
    value = float(raw) if JSON_NUMBER.match(raw) else math.nan
    if not low <= value <= high:  # NaN and infinities fail too
        rule = what or f"a number {low:g}-{high:g}"
        raise UserError(f"query parameter {key}={raw[:40]!r} must be {rule}")
    return value


def integer(request: Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) < 20) or not low <= int(raw) <= high:
        raise UserError(f"query parameter {key}={raw[:40]!r} must be a whole number {low}-{high}")
    return int(raw)


def boolean(request: Request, key: str, default: bool) -> bool:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    if raw not in ("true", "false"):
        raise UserError(f"query parameter {key}={raw[:40]!r} must be true or false")
    return raw == "true"


def timestamp(request: Request, key: str, default: float) -> float:
    return number(
        request, key, default, -sys.float_info.max, sys.float_info.max, "a unix timestamp"
    )
