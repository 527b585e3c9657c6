"""Output of `ember triggers`: the server's trigger views as a table and as one-line summaries.

Pure like `render`: each builder takes `now` and the server's address and returns a renderable.
Text from the server (names, errors) is never parsed as markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ember.cli.render import ago

# What the server answers. Unknown fields are ignored: an older CLI still reads a newer server.


class TriggerView(msgspec.Struct, frozen=True):
    """One trigger, as GET /api/v1/functions/{name}/triggers lists it."""

    id: str
    function: str  # "namespace/name"
    name: str
    type: str
    origin: str = "api"  # manifest | api
    config: dict[str, Any] = {}  # the source's keys; secrets are "***"
    filter: list[dict[str, str]] = []
    delivery: dict[str, Any] = {}
    state: str = "starting"  # running | paused | failing | starting
    error: str = ""
    since: float = 0.0  # unix time of the last change of state
    delivered: int = 0
    failed: int = 0
    filtered: int = 0
    queued: int = 0
    lag: int = 0
    oldest_age: float = 0.0  # seconds the oldest undelivered event has waited; 0: none
    hook: str = ""  # webhooks: /hooks/{id}


class TriggerList(msgspec.Struct, frozen=True):
    triggers: list[TriggerView]


class Deleted(msgspec.Struct, frozen=True):
    deleted: str


_STATE_STYLES = {"running": "green", "paused": "yellow", "failing": "bold red", "starting": "cyan"}


def state_text(state: str) -> Text:
    return Text(state, style=_STATE_STYLES.get(state, ""))


def age(seconds: float) -> str:
    """How long the oldest event has waited: '-', '0.4s', '45s', '5m', '2h'."""
    if seconds <= 0:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    return ago(0.0, seconds).removesuffix(" ago")


def since(view: TriggerView, now: float) -> str:
    return ago(view.since, now) if view.since else "-"


def hook_url(view: TriggerView, server: str) -> str:
    """Where a webhook trigger takes events: the server's address and /hooks/{id}."""
    return server.rstrip("/") + view.hook if view.hook else ""


def problem(view: TriggerView, now: float) -> Text:
    """'default/resize orders: failing since 5m ago: <error>'."""
    when = f" since {since(view, now)}" if view.since else ""
    return Text.assemble(
        (f"{view.function} {view.name}: ", "bold"),
        state_text(view.state),
        f"{when}: ",
        (view.error, "red" if view.state == "failing" else ""),
    )


def triggers_table(
    views: Sequence[TriggerView], now: float, server: str, empty: str = "no triggers"
) -> RenderableType:
    """One row per trigger: state and since when, counts, lag, the oldest event's age; under
    the table, webhooks' URLs and errors (long lines a table would squeeze)."""
    if not views:
        return Text(empty, style="dim")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("FUNCTION", "NAME"):  # wrap in a narrow terminal; the rest stays whole
        table.add_column(column, overflow="fold")
    for column in ("TYPE", "STATE", "SINCE"):
        table.add_column(column, no_wrap=True)
    for column in ("DELIVERED", "FAILED", "FILTERED", "LAG", "OLDEST"):
        table.add_column(column, no_wrap=True, justify="right")
    for view in views:
        table.add_row(
            Text(view.function),
            Text(view.name, style="bold"),
            Text(view.type),
            state_text(view.state),
            since(view, now),
            str(view.delivered),
            str(view.failed),
            str(view.filtered),
            str(view.lag),
            age(view.oldest_age),
        )
    notes = [note for view in views for note in _notes(view, now, server)]
    return Group(table, Text(), *notes) if notes else table


def _notes(view: TriggerView, now: float, server: str) -> list[Text]:
    notes = []
    if view.hook:
        where = Text(f"{view.function} {view.name}: ", style="bold")
        notes.append(where.append(f"POST events to {hook_url(view, server)}", style="cyan"))
    if view.error:
        notes.append(problem(view, now))
    return notes


def summary(verb: str, view: TriggerView, now: float, server: str) -> Text:
    """After add, pause or resume: 'added trigger orders (nats) of default/resize: starting',
    the error when there is one, and a webhook's URL."""
    line = Text.assemble(
        f"{verb} trigger ",
        (view.name, "bold"),
        f" ({view.type}) of {view.function}: ",
        state_text(view.state),
    )
    if view.error:
        line.append(f" since {since(view, now)}: " if view.since else ": ")
        line.append(view.error, style="red" if view.state == "failing" else "")
    if view.hook:
        line.append(f"\nPOST events to {hook_url(view, server)}")
    return line
