"""`req.event` and `req.events`: the CloudEvents 1.0 a request carries in the HTTP binding's
binary, structured or batch mode, parsed on first access.

Parsed here without the `cloudevents` SDK, on purpose (the server's side,
`ember.triggers.envelope`, uses it):
- a sandbox shows, of the host's site-packages, only the runtime's own distributions (`ember`,
  `msgspec`: `host_paths.RUNTIME_DISTRIBUTIONS`): the SDK (and its `python-dateutil`) is not
  importable inside a function unless the function brings it itself;
- importing it costs 25 ms (`cloudevents.core.v1.event`) to 60 ms (`cloudevents.core.bindings.
  http`), measured: in every zygote if imported there, or on the first event of every new
  instance if imported lazily, against starts of a few milliseconds.
Reading the binding is small: `ce-*` headers percent-decoded, or one JSON object (an array of
them for a batch); then the spec's rules are checked (required attributes, specversion 1.0,
attribute names, an RFC 3339 time with an offset) and a malformed event raises ValueError
naming what is wrong: ~8-12 us an event (timeit, a request with a few other headers).
This module imports only what the runtime has loaded already (json, base64, binascii,
datetime, urllib.parse) and is itself imported on the first `req.event` (~0.5 ms in a new
instance, from cached bytecode; importing it in the root zygote would make that free).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from urllib.parse import unquote

SPECVERSION = "1.0"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
REQUIRED = ("specversion", "id", "source", "type")
OPTIONAL = ("time", "subject", "datacontenttype", "dataschema")
_ATTRIBUTES = frozenset((*REQUIRED, *OPTIONAL))


class CloudEvent:
    """One event. `data` is the body's bytes in binary mode; in structured mode the JSON
    value of `data`, its string (for a non-JSON `datacontenttype`), or the bytes of
    `data_base64`; None if it has none. Absent optional attributes are None."""

    __slots__ = (
        "_decoded",
        "data",
        "datacontenttype",
        "dataschema",
        "extensions",
        "id",
        "source",
        "specversion",
        "subject",
        "time",
        "type",
    )

    def __init__(self, attributes: dict[str, Any], data: Any, decoded: bool = False) -> None:
        self.specversion: str = attributes["specversion"]
        self.id: str = attributes["id"]
        self.source: str = attributes["source"]
        self.type: str = attributes["type"]
        self.time: str | None = attributes.get("time")
        self.subject: str | None = attributes.get("subject")
        self.datacontenttype: str | None = attributes.get("datacontenttype")
        self.dataschema: str | None = attributes.get("dataschema")
        self.extensions: dict[str, Any] = {
            k: v for k, v in attributes.items() if k not in _ATTRIBUTES
        }
        self.data: Any = data
        self._decoded = decoded  # `data` is a JSON value already

    def json(self) -> Any:
        """The data parsed as JSON (in structured mode with JSON data, `data` itself)."""
        if self._decoded:
            return self.data
        if self.data is None:
            raise ValueError(f"CloudEvent {self.id!r} has no data")
        return json.loads(self.data)

    def __repr__(self) -> str:
        return f"CloudEvent(id={self.id!r}, source={self.source!r}, type={self.type!r})"


class Carried:
    """The CloudEvents of one request, and whether they came as a batch."""

    __slots__ = ("batch", "events")

    def __init__(self, events: list[CloudEvent], batch: bool = False) -> None:
        self.events = events
        self.batch = batch

    def one(self) -> CloudEvent | None:
        if self.batch:
            raise ValueError(
                f"the request carries a batch of {len(self.events)} CloudEvents: read req.events"
            )
        return self.events[0] if self.events else None


def parse(headers: Iterable[tuple[bytes, bytes]], body: bytes) -> Carried:
    """The events a request carries (none: not a CloudEvent); ValueError if malformed."""
    ctype = ""
    fields: dict[str, bytes] = {}
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-type":
            ctype = ctype or value.decode("latin-1").strip()
        elif lower.startswith(b"ce-"):
            fields.setdefault(lower[3:].decode("latin-1"), value)
    media = ctype.partition(";")[0].strip().lower()
    if media == BATCH:
        where = "CloudEvents batch"
        items = _json(body, where)
        if not isinstance(items, list):
            raise ValueError(f"{where}: the body must be a JSON array of events")
        return Carried([_structured(e, f"{where}, event {i}") for i, e in enumerate(items)], True)
    if media.startswith("application/cloudevents"):
        where = "structured CloudEvent"
        if media != STRUCTURED:
            raise ValueError(f"{where}: format {media!r} is not supported; send {STRUCTURED}")
        return Carried([_structured(_json(body, where), where)])
    if fields:
        return Carried([_binary(fields, ctype, body)])
    return Carried([])


def _json(body: bytes, where: str) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{where}: bad JSON: {exc}") from None


def _binary(fields: dict[str, bytes], ctype: str, body: bytes) -> CloudEvent:
    where = "binary-mode CloudEvent"
    attributes: dict[str, Any] = {}
    for name, raw in fields.items():
        attributes[name] = unquote(raw.decode("utf-8", "replace"))
    if ctype:
        attributes["datacontenttype"] = ctype
    _check(attributes, where, lambda name: f"header ce-{name}")
    return CloudEvent(attributes, body)


def _structured(envelope: object, where: str) -> CloudEvent:
    if not isinstance(envelope, dict):
        raise ValueError(f"{where}: must be a JSON object, not {type(envelope).__name__}")
    attributes = {
        k: v for k, v in envelope.items() if v is not None and k not in ("data", "data_base64")
    }
    _check(attributes, where, lambda name: f'member "{name}"')
    data, encoded = envelope.get("data"), envelope.get("data_base64")
    if data is not None and encoded is not None:
        raise ValueError(f'{where}: has both "data" and "data_base64"; send one')
    if encoded is not None:
        try:
            return CloudEvent(attributes, base64.b64decode(encoded, validate=True))
        except (binascii.Error, TypeError, ValueError):
            raise ValueError(f'{where}: member "data_base64" is not base64') from None
    ctype = attributes.get("datacontenttype")
    decoded = data is not None and (not isinstance(data, str) or ctype is None or _is_json(ctype))
    return CloudEvent(attributes, data, decoded)


def _valid_name(name: str) -> bool:
    """The spec's attribute names: lower-case letters "a-z" and digits only (no `re` here:
    compiling a pattern would cost every instance's first event ~50 us)."""
    return name.isascii() and name.isalnum() and (name.islower() or name.isdigit())


def _is_json(ctype: str) -> bool:
    media = ctype.partition(";")[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


def _check(attributes: dict[str, Any], where: str, label: Callable[[str], str]) -> None:
    """The spec's rules for the attributes; `label(name)` says where one was sent."""
    for name in REQUIRED:
        if name not in attributes:
            raise ValueError(f"{where}: missing {label(name)}")
    for name, value in attributes.items():
        if name in _ATTRIBUTES:
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: {label(name)} must be a non-empty string")
        elif name == "data" or not _valid_name(name):
            raise ValueError(
                f"{where}: {label(name)} is not a valid attribute name "
                "(lower-case letters and digits)"
            )
        elif not isinstance(value, str | int):  # bool is an int
            raise ValueError(
                f"{where}: extension {label(name)} must be a string, integer or boolean"
            )
    if attributes["specversion"] != SPECVERSION:
        raise ValueError(
            f"{where}: {label('specversion')} is {attributes['specversion']!r}; "
            f"only CloudEvents {SPECVERSION} is understood"
        )
    if "time" in attributes:
        _check_time(attributes["time"], where, label)


def _check_time(value: str, where: str, label: Callable[[str], str]) -> None:
    try:
        aware = datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        aware = False
    if not aware:
        raise ValueError(
            f"{where}: {label('time')} {value!r} is not an RFC 3339 timestamp "
            "(e.g. 2024-05-01T12:00:00Z)"
        )
