"""What changed from one revision to the next, for `ember revisions`."""

from __future__ import annotations

from typing import Any

import msgspec

from ember.store.base import RevisionRecord


def revision_changes(before: RevisionRecord | None, rec: RevisionRecord) -> list[str]:
    """What differs from the revision before: the code (by its tree hash) and each setting."""
    if before is None:
        return ["first revision"]
    out = []
    if rec.tree and before.tree:
        if rec.tree != before.tree:
            out.append("code")
    elif rec.bundle != before.bundle:
        out.append("code (or only the bundle)")
    old, new = _flat(msgspec.to_builtins(before.spec)), _flat(msgspec.to_builtins(rec.spec))
    for key in sorted(old.keys() | new.keys()):
        if key == "name" or old.get(key) == new.get(key):
            continue
        out.append(f"{key}: {_show(old.get(key))} -> {_show(new.get(key))}")
    return out or ["no change (redeployed after another revision)"]


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."
