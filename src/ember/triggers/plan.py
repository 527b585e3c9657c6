"""A declared trigger (`TriggerSpec`, as ember.yaml or `ember triggers add` gave it) checked
into what runs it: its source type and settings, its filters and its delivery. Every mistake is
a `TriggerError` naming the key, so deploy can answer 422 with it (docs/triggers.md)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from ember.spec import TriggerSpec
from ember.triggers.base import ATTRIBUTES, Event, Source, TriggerError
from ember.triggers.registry import source_type

DIRECT, QUEUE = "direct", "queue"
MAX_CONCURRENCY = 1000
MAX_BATCH = 1000
_EXTENSION_RE = re.compile(r"[a-z0-9]{1,20}\Z")  # CloudEvents: lower-case letters and digits
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)?\Z")


class Filter(msgspec.Struct, frozen=True):
    attribute: str
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None

    def matches(self, event: Event) -> bool:
        value = event.attribute(self.attribute)
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        return self.suffix is not None and value.endswith(self.suffix)


class Delivery(msgspec.Struct, frozen=True):
    mode: str = DIRECT  # direct: run now, queue on failure; queue: every event queued first
    concurrency: int = 16  # events (or batches) of this trigger in flight at once
    order_by: str = ""  # "": no order; "key": the source's key; else a CloudEvents attribute
    batch_size: int = 1  # > 1: a CloudEvents batch of up to this many events per request
    batch_wait: float = 0.05  # seconds a batch waits to fill
    structured: bool = False  # the event as application/cloudevents+json, not ce-* headers
    path: str = ""  # appended to /fn/namespace/name (e.g. "/events")

    @property
    def capacity(self) -> int:
        """Messages the trigger holds unacknowledged at most."""
        return self.concurrency * self.batch_size


class Plan(msgspec.Struct, frozen=True):
    spec: TriggerSpec
    source: type[Source]
    config: dict[str, Any]
    filters: tuple[Filter, ...]
    delivery: Delivery

    def wanted(self, event: Event) -> bool:
        return all(f.matches(event) for f in self.filters)


def plan(spec: TriggerSpec) -> Plan:
    """`spec` checked; raises `TriggerError` with the key at fault (`filter[1].prefix`)."""
    source = source_type(spec.type)
    config = source.validate(spec.config)
    return Plan(spec, source, config, _filters(spec.filter), _delivery(spec.delivery))


def describe(spec: TriggerSpec, error: TriggerError) -> str:
    return f"trigger {spec.name!r} ({spec.type}) {error}"


def _filters(value: list[Any]) -> tuple[Filter, ...]:
    if not isinstance(value, list):
        raise TriggerError("filter", "must be a list of {attribute, exact|prefix|suffix}")
    return tuple(_filter(entry, f"filter[{i}]") for i, entry in enumerate(value))


def _filter(entry: object, where: str) -> Filter:
    example = "e.g. {attribute: type, prefix: com.example.}"
    if not isinstance(entry, dict):
        raise TriggerError(where, f"must be a mapping, {example}")
    unknown = set(entry) - {"attribute", "exact", "prefix", "suffix"}
    if unknown:
        raise TriggerError(f"{where}.{sorted(unknown)[0]}", f"is not a filter key; {example}")
    attribute = entry.get("attribute")
    if not isinstance(attribute, str) or not (
        attribute in ATTRIBUTES or _EXTENSION_RE.match(attribute)
    ):
        raise TriggerError(
            f"{where}.attribute",
            f"{attribute!r} is not a CloudEvents attribute: name one of "
            f"{', '.join(ATTRIBUTES)} or an extension (lower-case letters and digits)",
        )
    tests = {k: v for k, v in entry.items() if k != "attribute"}
    if len(tests) != 1:
        raise TriggerError(where, f"needs exactly one of exact, prefix or suffix; {example}")
    ((kind, text),) = tests.items()
    if not isinstance(text, str) or (kind != "exact" and not text):
        raise TriggerError(f"{where}.{kind}", f"must be a non-empty string, not {text!r}")
    return Filter(attribute, **{kind: text})


def _delivery(value: Mapping[str, Any]) -> Delivery:
    if not isinstance(value, dict):
        raise TriggerError("delivery", "must be a mapping of mode, concurrency, order_by, batch")
    allowed = ("mode", "concurrency", "order_by", "batch", "structured", "path")
    for key in value:
        if key not in allowed:
            raise TriggerError(f"delivery.{key}", f"is not a delivery key; known: {allowed}")
    mode = value.get("mode", DIRECT)
    if mode not in (DIRECT, QUEUE):
        raise TriggerError("delivery.mode", f"must be direct or queue, not {mode!r}")
    concurrency = _whole(value.get("concurrency", 16), "delivery.concurrency", MAX_CONCURRENCY)
    order_by = value.get("order_by", "")
    if not isinstance(order_by, str) or (
        order_by
        and order_by != "key"
        and order_by not in ATTRIBUTES
        and not _EXTENSION_RE.match(order_by)
    ):
        raise TriggerError(
            "delivery.order_by",
            f"{order_by!r}: write key (the source's own key) or a CloudEvents attribute",
        )
    size, wait = 1, 0.05
    if "batch" in value:
        batch = value["batch"]
        if not isinstance(batch, dict) or set(batch) - {"size", "max_wait"}:
            raise TriggerError("delivery.batch", "must be a mapping of size and max_wait")
        size = _whole(batch.get("size", 10), "delivery.batch.size", MAX_BATCH)
        wait = _seconds(batch.get("max_wait", "1s"), "delivery.batch.max_wait")
    if order_by and size > 1:
        raise TriggerError(
            "delivery.order_by", "cannot be combined with delivery.batch; choose one"
        )
    structured = value.get("structured", False)
    if not isinstance(structured, bool):
        raise TriggerError("delivery.structured", "must be true or false")
    path = value.get("path", "")
    if not isinstance(path, str) or (path and not path.startswith("/")) or " " in path:
        raise TriggerError("delivery.path", f"must start with / and hold no spaces: {path!r}")
    return Delivery(mode, concurrency, order_by, size, wait, structured, path)


def _whole(value: object, key: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise TriggerError(key, f"must be a whole number from 1 to {high}, not {value!r}")
    return value


def _seconds(value: object, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (found := _DURATION_RE.match(value.strip())):
        unit = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[found.group(2)]
        seconds = float(found.group(1)) * unit
    else:
        raise TriggerError(key, f"{value!r} is not a duration; write e.g. 200ms or 2s")
    if not 0.001 <= seconds <= 60:
        raise TriggerError(key, f"must be from 1ms to 60s, not {value!r}")
    return seconds
