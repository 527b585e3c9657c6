"""CloudEvents 1.0 over HTTP, both ways: how an `Event` reaches a function (binary, structured
or batch mode) and how CloudEvents a caller sends are read (`from_http`).

Writing is on the trigger's hot path, so it builds the header list and the JSON (msgspec)
directly: `binary` takes ~2 us an event (~5 us with values to percent-encode), `structured`
~1.5 us, where the `cloudevents` SDK's `to_binary` takes ~12 us (it builds and validates a
`CloudEvent` per event; timeit, same event, same machine).
Reading uses the SDK (`cloudevents.core`, 2.x): its HTTP binding maps `ce-*` headers to
attributes, its JSON format reads envelopes, its `CloudEvent` validates them (~25-35 us an
event). It is imported on the first read (~60 ms), not with this module. A `time` read is
normalised to RFC 3339 as the SDK parses it (`...:00.5Z` becomes `...:00.500000Z`).
"""

from __future__ import annotations

import base64
import functools
import json
import re
import time
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, unquote

import msgspec

from ember.triggers.base import Event

if TYPE_CHECKING:
    from cloudevents.core.base import BaseCloudEvent

Headers = list[tuple[bytes, bytes]]
Mode = Literal["binary", "structured", "batch", ""]

SPECVERSION = "1.0"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUIRED = ("specversion", "id", "source", "type")
OPTIONAL = ("time", "subject", "datacontenttype", "dataschema")
RESERVED = frozenset((*REQUIRED, *OPTIONAL, "data", "data_base64"))

_NAME = re.compile(r"[a-z0-9]+")  # an attribute's name (spec: "a-z" and "0-9" only)
# What the HTTP binding percent-encodes: space, '"', '%' and all but printable ASCII.
_UNSAFE = re.compile(r"[^\x21\x23\x24\x26-\x7e]")
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_HEADER_TEXT = re.compile(r"[\x20-\x7e]+")  # a Content-Type value that can go out as is
_ENCODER = msgspec.json.Encoder()
_STRUCTURED_HEADERS = ((b"content-type", b"application/cloudevents+json; charset=utf-8"),)
_BATCH_HEADERS = ((b"content-type", BATCH.encode()),)


class _Malformed(ValueError):
    """A malformed event, in a message that names what is wrong already."""


_second = (0, "")  # the last second `now` formatted, and its text


def now() -> str:
    """The current time in RFC 3339, UTC (the second's text is formatted once a second)."""
    global _second
    t = time.time()
    whole = int(t)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((t - whole) * 1e6):06d}Z"


def _value(text: str) -> bytes:
    """A header value as the HTTP binding writes it (percent-encoded where it must be)."""
    if _UNSAFE.search(text) is None:
        return text.encode("ascii")
    return quote(text, safe=_SAFE).encode("ascii")


@functools.lru_cache(maxsize=512)
def _extension(name: str) -> bytes | None:
    """`ce-NAME` for a valid extension name; None for one the spec forbids (left out)."""
    if name in RESERVED or _NAME.fullmatch(name) is None:
        return None
    return b"ce-" + name.encode("ascii")


def binary(event: Event) -> tuple[Headers, bytes]:
    """Binary mode: the attributes as `ce-*` headers, the data as the body."""
    headers = [
        (b"ce-specversion", b"1.0"),
        (b"ce-id", _value(event.id)),
        (b"ce-source", _value(event.source)),
        (b"ce-type", _value(event.type)),
        (b"ce-time", _value(event.time or now())),
    ]
    if event.subject:
        headers.append((b"ce-subject", _value(event.subject)))
    if event.dataschema:
        headers.append((b"ce-dataschema", _value(event.dataschema)))
    for name, value in event.extensions.items():
        header = _extension(name)
        if header is not None:
            headers.append((header, _value(str(value))))
    ctype = event.datacontenttype
    if ctype and _HEADER_TEXT.fullmatch(ctype):  # else no valid header can carry it
        headers.append((b"content-type", ctype.encode("ascii")))
    return headers, event.data


@functools.lru_cache(maxsize=256)
def _kind(ctype: str) -> Literal["json", "text", ""]:
    media = ctype.partition(";")[0].strip().lower()
    if media in ("application/json", "text/json") or media.endswith("+json"):
        return "json"
    return "text" if media.startswith("text/") else ""


def _data(data: bytes, ctype: str) -> tuple[str, object]:
    """The envelope's member for the data: `data` as a JSON value (JSON that parses) or a
    string (text that is UTF-8), else `data_base64`."""
    kind = _kind(ctype) if ctype else ""
    if kind == "json":
        try:
            return "data", msgspec.json.decode(data, type=msgspec.Raw)  # kept byte for byte
        except msgspec.DecodeError:
            pass
    elif kind == "text":
        try:
            return "data", data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return "data_base64", base64.b64encode(data).decode("ascii")


def envelope(event: Event) -> dict[str, object]:
    """The event as a JSON-format envelope (structured mode's body, a batch's element)."""
    out: dict[str, object] = {
        "specversion": SPECVERSION,
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "time": event.time or now(),
    }
    if event.subject:
        out["subject"] = event.subject
    if event.dataschema:
        out["dataschema"] = event.dataschema
    for name, value in event.extensions.items():
        if _extension(name) is not None:
            out[name] = str(value)
    if event.datacontenttype:
        out["datacontenttype"] = event.datacontenttype
    if event.data:
        member, data = _data(event.data, event.datacontenttype)
        out[member] = data
    return out


def structured(event: Event) -> tuple[Headers, bytes]:
    """Structured mode: the whole event as one JSON envelope."""
    return list(_STRUCTURED_HEADERS), _ENCODER.encode(envelope(event))


def batch(events: Iterable[Event]) -> tuple[Headers, bytes]:
    """Batch mode: a JSON array of envelopes."""
    return list(_BATCH_HEADERS), _ENCODER.encode([envelope(e) for e in events])


# Reading -------------------------------------------------------------------------------------


def _fields(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header names lower-cased; of a repeated header, the first value."""
    out: dict[str, str] = {}
    for name, value in headers:
        out.setdefault(name.decode("latin-1").lower(), value.decode("utf-8", "replace"))
    return out


def content_mode(headers: Iterable[tuple[bytes, bytes]]) -> Mode:
    """Which CloudEvents mode a request uses; "" if it carries no CloudEvent."""
    return _mode(_fields(headers))


def _mode(fields: dict[str, str]) -> Mode:
    media = fields.get("content-type", "").partition(";")[0].strip().lower()
    if media == BATCH:
        return "batch"
    if media.startswith("application/cloudevents"):
        return "structured"
    return "binary" if any(name.startswith("ce-") for name in fields) else ""


def from_http(headers: Iterable[tuple[bytes, bytes]], body: bytes) -> list[Event]:
    """The events an HTTP request carries, in binary, structured or batch mode; [] if it
    carries none. Raises ValueError naming what is wrong with a malformed one."""
    try:
        return _read(_fields(headers), body)
    except _Malformed as exc:
        raise ValueError(str(exc)) from None


def _read(fields: dict[str, str], body: bytes) -> list[Event]:
    mode = _mode(fields)
    if mode == "binary":
        return [_binary(fields, body)]
    if mode == "structured":
        media = fields["content-type"].partition(";")[0].strip().lower()
        if media != STRUCTURED:
            raise ValueError(
                f"structured CloudEvent: format {media!r} is not supported; send {STRUCTURED}"
            )
        return [_structured(body, "structured CloudEvent")]
    if mode == "batch":
        try:
            items = msgspec.json.decode(body, type=list[msgspec.Raw])
        except msgspec.DecodeError as exc:
            raise ValueError(
                f"CloudEvents batch: bad JSON, not an array of events: {exc}"
            ) from None
        return [
            _structured(bytes(raw), f"CloudEvents batch, event {i}") for i, raw in enumerate(items)
        ]
    return []


def _binary(fields: dict[str, str], body: bytes) -> Event:
    where = "binary-mode CloudEvent"
    for name in REQUIRED:
        if not fields.get(f"ce-{name}"):
            raise ValueError(f"{where}: missing header ce-{name}")
    _check_version(unquote(fields["ce-specversion"]), f"{where}: header ce-specversion")
    sdk = _sdk()
    if fields.get("content-type") == "":
        del fields["content-type"]  # no datacontenttype
    try:
        event = sdk.http.from_binary(sdk.http.HTTPMessage(fields, body), sdk.raw, sdk.CloudEvent)
    except (sdk.CloudEventError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{where}: {_reason(exc, fields.get('ce-time'), 'header ce-time')}"
        ) from None
    return _event(event, body)


def _structured(body: bytes, where: str) -> Event:
    if body.lstrip()[:1] != b"{":
        raise ValueError(f"{where}: bad JSON, the envelope must be a JSON object")
    sdk = _sdk()
    try:
        event = sdk.json.read(functools.partial(_checked, where), body)
    except _Malformed:
        raise
    except (sdk.CloudEventError, ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {_reason(exc, _time_member(body), 'member time')}") from None
    data = event.get_data()
    ctype = event.get_datacontenttype() or ""
    if data is None:
        raw = b""
    elif isinstance(data, bytes):  # from data_base64
        raw = data
    elif isinstance(data, str) and ctype and _kind(ctype) != "json":
        raw = data.encode("utf-8")
    else:  # a JSON value (a missing datacontenttype means application/json)
        raw = _ENCODER.encode(data)
        ctype = ctype or "application/json"
    return _event(event, raw, ctype)


def _checked(where: str, attributes: dict[str, Any], data: Any) -> BaseCloudEvent:
    """The SDK's event factory, refusing what it would otherwise fill in (an id, a version)."""
    for name in REQUIRED:
        if not attributes.get(name):
            raise _Malformed(f'{where}: missing member "{name}"')
    _check_version(attributes["specversion"], f'{where}: member "specversion"')
    if "data_base64" in attributes:
        raise _Malformed(f'{where}: has both "data" and "data_base64"; send one')
    for name, value in attributes.items():
        if name not in RESERVED and not isinstance(value, str | int | bool):
            raise _Malformed(
                f'{where}: extension "{name}" must be a string, number or boolean, not {value!r}'
            )
    return _sdk().CloudEvent(attributes, data)


def _check_version(value: object, what: str) -> None:
    if value != SPECVERSION:
        raise _Malformed(f"{what} is {value!r}; Ember reads CloudEvents {SPECVERSION} only")


def _reason(exc: BaseException, stamp: str | None, what: str) -> str:
    """What the SDK's error means; a time it cannot parse is named as such."""
    if stamp is not None:
        try:
            datetime.fromisoformat(unquote(stamp))
        except ValueError:
            return f"{what} {stamp!r} is not an RFC 3339 timestamp"
    if isinstance(exc, json.JSONDecodeError | msgspec.DecodeError | UnicodeDecodeError):
        return f"bad JSON: {exc}"
    errors = getattr(exc, "errors", None)  # the SDK's validation errors, by attribute
    if isinstance(errors, dict):
        return "; ".join(str(e) for found in errors.values() for e in found)
    return str(exc)


def _time_member(body: bytes) -> str | None:
    """The envelope's `time` as sent (read again only to explain an error)."""
    try:
        value = msgspec.json.decode(body).get("time")
    except (msgspec.DecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None if value is None else repr(value)


def _event(event: BaseCloudEvent, data: bytes, ctype: str | None = None) -> Event:
    attributes = event.get_attributes()
    when = attributes.get("time")
    return Event(
        id=attributes["id"],
        source=attributes["source"],
        type=attributes["type"],
        time=_rfc3339(when) if isinstance(when, datetime) else "",
        subject=attributes.get("subject") or "",
        datacontenttype=(attributes.get("datacontenttype") or "") if ctype is None else ctype,
        dataschema=attributes.get("dataschema") or "",
        data=data,
        extensions={k: _text(v) for k, v in attributes.items() if k not in RESERVED},
    )


def _rfc3339(when: datetime) -> str:
    text = when.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _text(value: object) -> str:
    """An extension's value in its canonical string form (booleans as "true"/"false")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _SDK:
    """The parts of the SDK `from_http` uses, imported once, on first use."""

    def __init__(self) -> None:
        from cloudevents.core.bindings import http
        from cloudevents.core.exceptions import BaseCloudEventException
        from cloudevents.core.formats.json import JSONFormat
        from cloudevents.core.v1.event import CloudEvent

        class Raw(JSONFormat):
            """Binary mode's body kept as sent (the JSON format would parse JSON data)."""

            def read_data(self, body: bytes, datacontenttype: str | None) -> bytes:
                return body

        self.http = http
        self.json = JSONFormat()
        self.raw = Raw()
        self.CloudEvent = CloudEvent
        self.CloudEventError = BaseCloudEventException


@functools.cache
def _sdk() -> _SDK:
    return _SDK()
