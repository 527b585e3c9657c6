"""Triggers as the store keeps them, and the part of the store the trigger manager uses."""

from __future__ import annotations

from typing import Protocol

import msgspec

from ember.spec import TriggerSpec

MANIFEST, API = "manifest", "api"


class TriggerRecord(msgspec.Struct, frozen=True):
    """A trigger of a function: declared in its ember.yaml (origin "manifest", replaced on each
    deploy) or added with `ember triggers add` (origin "api", kept across deploys)."""

    id: str  # stable for the trigger's life: /hooks/{id}, consumer names
    function: str  # "namespace/name"
    name: str
    origin: str
    spec: TriggerSpec
    paused: bool
    created: float


class Records(Protocol):
    """ember.store.sqlite.SQLiteStore meets it."""

    async def triggers(self) -> list[TriggerRecord]: ...

    async def put_trigger(self, rec: TriggerRecord) -> None: ...

    async def delete_trigger(self, function: str, name: str) -> bool: ...

    async def trigger_state(self, id: str) -> bytes: ...

    async def set_trigger_state(self, id: str, state: bytes) -> None: ...
