"""Source types by name, from the `ember.triggers` entry-point group (Ember's own sources are
registered there too, in pyproject.toml, so a connector is found the same way). A type's module
is imported when a trigger of that type is first checked or started, not before: the broker
clients (aio-pika, aiomqtt, asyncpg, redis) cost a server that uses none of them nothing."""

from __future__ import annotations

import functools
import logging
from importlib.metadata import EntryPoint, entry_points

from ember.triggers.base import Source, TriggerError

log = logging.getLogger("ember.triggers")
GROUP = "ember.triggers"


@functools.cache
def _entries() -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group=GROUP)}


@functools.cache
def _load(name: str) -> type[Source]:
    entry = _entries()[name]
    try:
        loaded: type[Source] = entry.load()
    except Exception as exc:  # a broken connector: its triggers fail, not the server
        log.error("trigger type %s (%s) cannot be loaded: %s", name, entry.value, exc)
        raise TriggerError(
            "type", f"trigger type {name!r} is installed but cannot be loaded: {exc}"
        ) from None
    return loaded


def source_type(name: object) -> type[Source]:
    known = _entries()
    if not isinstance(name, str) or name not in known:
        raise TriggerError(
            "type", f"unknown trigger type {name!r}; known: {', '.join(sorted(known))}"
        )
    return _load(name)
