"""Source types by name, from the `ember.triggers` entry-point group (Ember's own sources are
registered there too, in pyproject.toml, so a connector is found the same way)."""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points

from ember.triggers.base import Source, TriggerError

log = logging.getLogger("ember.triggers")
GROUP = "ember.triggers"


@functools.cache
def types() -> dict[str, type[Source]]:
    found: dict[str, type[Source]] = {}
    for entry in entry_points(group=GROUP):
        try:
            found[entry.name] = entry.load()
        except Exception as exc:  # one broken connector must not hide the others
            log.error("trigger type %s (%s) cannot be loaded: %s", entry.name, entry.value, exc)
    return found


def source_type(name: object) -> type[Source]:
    known = types()
    if not isinstance(name, str) or name not in known:
        raise TriggerError(
            "type", f"unknown trigger type {name!r}; known: {', '.join(sorted(known))}"
        )
    return known[name]
