"""`ember triggers`: a function's event triggers — list, add, remove, pause, resume.

A Typer sub-app that `ember.cli.main` registers. Building a trigger from the command line
(`--set`, `--filter`, the delivery options, or `-f FILE`) is pure and tested in
tests/unit/test_cli_triggers.py; the result has the shape of one entry of `triggers:` in
ember.yaml, and the server validates it as it validates that.
"""

import enum
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, ParamSpec

import typer

from ember.cli import render
from ember.cli.commands import subcommand
from ember.errors import UserError

if TYPE_CHECKING:
    from ember.cli import client

P = ParamSpec("P")

app = typer.Typer(
    no_args_is_help=True,
    help="Event triggers (docs/triggers.md): what calls a function when a message, a schedule "
    "or a webhook arrives. Those in ember.yaml come with each deploy; these commands add more.",
)


def command(name: str) -> Callable[[Callable[P, None]], Callable[P, None]]:
    """Register `fn` as `ember triggers NAME`."""
    return subcommand(app, name)


def _connect() -> "client.Client":
    from ember.cli import main

    return main._connect()


def _server() -> str:
    from ember.cli import main

    return main.server_url()


# Building the trigger: pure.

# Keys of a trigger that are the runner's, not the source's, and the option that sets each.
RUNNER_KEYS = {
    "type": "--type",
    "name": "--name",
    "filter": "--filter",
    "delivery": "--mode, --concurrency, --order-by or --batch-size",
}
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_FILTER = re.compile(r"([a-z0-9]+)(\^=|\$=|=)(.*)", re.DOTALL)
_MATCHES = {"=": "exact", "^=": "prefix", "$=": "suffix"}


class Mode(enum.StrEnum):
    direct = "direct"
    queue = "queue"


def yaml_value(text: str) -> object:
    """A value as YAML reads it when it is a number, true/false, a quoted string, a [list] or a
    {mapping}; anything else stays the text as written ('*/5 * * * *', '@every 10s', '10s')."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    start = text.strip()[:1]
    if isinstance(value, bool | int | float) or (start and start in "'\"[{"):
        return value
    return text


def parse_setting(text: str) -> tuple[str, object]:
    """--set KEY=VALUE → (KEY, VALUE read by `yaml_value`)."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if not equals or _KEY.fullmatch(key) is None:
        raise UserError(
            f"--set {text!r} is not KEY=VALUE; write e.g. --set url=nats://127.0.0.1:4222",
            code="bad_trigger",
        )
    if key in RUNNER_KEYS:
        raise UserError(
            f"--set {key}=…: {key} is not a key of the source; give it with {RUNNER_KEYS[key]}",
            code="bad_trigger",
        )
    return key, yaml_value(value)


def parse_filter(text: str) -> dict[str, str]:
    """--filter ATTR=VALUE (exact), ATTR^=PREFIX or ATTR$=SUFFIX → one entry of `filter:`."""
    found = _FILTER.fullmatch(text)
    if found is None:
        raise UserError(
            f"--filter {text!r} is not ATTR=VALUE, ATTR^=PREFIX or ATTR$=SUFFIX (ATTR a "
            "CloudEvents attribute, lowercase: type, subject, source, …); write e.g. "
            "--filter subject^=orders.",
            code="bad_trigger",
        )
    attribute, operator, value = found.groups()
    return {"attribute": attribute, _MATCHES[operator]: value}


def delivery(
    *,
    mode: str | None = None,
    concurrency: int | None = None,
    order_by: str | None = None,
    batch_size: int | None = None,
    batch_wait: str | None = None,
) -> dict[str, object]:
    """The `delivery:` mapping with only the options given (the server fills the defaults)."""
    out: dict[str, object] = {}
    if mode is not None:
        out["mode"] = mode
    if concurrency is not None:
        out["concurrency"] = concurrency
    if order_by is not None:
        out["order_by"] = order_by
    if batch_size is not None:
        batch: dict[str, object] = {"size": batch_size}
        if batch_wait is not None:
            batch["max_wait"] = yaml_value(batch_wait)
        out["batch"] = batch
    return out


def build_trigger(
    type_: str,
    name: str | None,
    settings: list[str],
    filters: list[str],
    deliver: dict[str, object],
) -> dict[str, object]:
    """The trigger as one entry of `triggers:` in ember.yaml: type, name, the source's keys,
    `filter`, `delivery` (the last two only when given)."""
    trigger: dict[str, object] = {"type": type_}
    if name is not None:
        trigger["name"] = name
    for text in settings:
        key, value = parse_setting(text)
        if key in trigger:
            raise UserError(f"--set {key} is given twice; give it once", code="bad_trigger")
        trigger[key] = value
    if filters:
        trigger["filter"] = [parse_filter(text) for text in filters]
    if deliver:
        trigger["delivery"] = deliver
    return trigger


def read_trigger(path: str, stdin: IO[str]) -> dict[str, object]:
    """-f FILE (- for standard input): one trigger as a YAML mapping."""
    import yaml

    shown = "standard input" if path == "-" else path
    try:
        text = stdin.read() if path == "-" else Path(path).expanduser().read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(f"cannot read trigger file {shown}: {reason}", code="bad_trigger") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(
            f"{shown} is not valid YAML: {exc}".replace("\n", " "), code="bad_trigger"
        ) from None
    if not isinstance(document, dict):
        raise UserError(
            f"{shown} must hold one trigger as a mapping (type: …, then its keys), the same as "
            "one entry under triggers: in ember.yaml",
            code="bad_trigger",
        )
    return {str(key): value for key, value in document.items()}


# Commands.

Function = Annotated[str, typer.Argument(help="Function name.", show_default=False)]
TriggerName = Annotated[
    str, typer.Argument(metavar="TRIGGER", help="Trigger name (see 'ember triggers ls').")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the server's JSON.")]
Namespace = Annotated[
    str,
    typer.Option(
        "--namespace",
        "--ns",
        envvar="EMBER_NAMESPACE",
        help="Namespace (tenant). Default: $EMBER_NAMESPACE or 'default'.",
    ),
]


@command("ls")
def ls(
    function: Annotated[
        str | None,
        typer.Argument(help="Only this function's. Default: all.", show_default=False),
    ] = None,
    as_json: JsonFlag = False,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace",
            "--ns",
            envvar="EMBER_NAMESPACE",
            help="FUNCTION's namespace (default 'default'); without FUNCTION, list only this "
            "namespace's. Default: $EMBER_NAMESPACE, else every namespace you may read.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """List triggers: state and since when, events, lag, the oldest event's age, webhook URLs.

    A failing trigger's error is under the table."""
    from ember.cli import client, render_triggers

    if function is not None:
        namespace = namespace or "default"
    with _connect() as api:
        raw = api.triggers(function, namespace)
    if as_json:
        render.write_bytes(raw, newline=True)
        return
    views = client.decode(raw, render_triggers.TriggerList).triggers
    empty = f"no triggers on {function}" if function else "no triggers"
    table = render_triggers.triggers_table(views, time.time(), _server(), empty=empty)
    render.out().print(table)


@command("add")
def add(
    function: Function,
    type_: Annotated[
        str | None,
        typer.Option(
            "--type",
            help="Source type: cron, webhook, nats, jetstream, mqtt, redis, amqp, postgres, or "
            "an installed connector's.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="Name, unique within the function. Default: the type's.", show_default=False
        ),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="One of the source's keys (url, subject, schedule, …); repeatable. VALUE is "
            "read as YAML reads it when it is a number, true/false, '\"quoted\"', a list like "
            "[1, 2] or a mapping like {a: 1}; otherwise it is the text as written.",
            show_default=False,
        ),
    ] = None,
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            metavar="ATTR=VALUE",
            help="Deliver only events whose CloudEvents attribute ATTR is VALUE; ATTR^=PREFIX "
            "and ATTR$=SUFFIX match its start or end; repeatable, all must match.",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Events delivered at once.", show_default=False)
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Deliver events in batches of up to N.", show_default=False),
    ] = None,
    batch_wait: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="With --batch-size: the longest a batch waits to fill, e.g. 500ms.",
            show_default=False,
        ),
    ] = None,
    order_by: Annotated[
        str | None,
        typer.Option(
            metavar="ATTR",
            help="Deliver events with the same value of this attribute in order, one at a time.",
            show_default=False,
        ),
    ] = None,
    mode: Annotated[
        Mode | None,
        typer.Option(
            help="direct: call the function, acknowledge once it succeeded; queue: acknowledge "
            "once the event is in the async queue (the function's async: retries apply).",
            show_default=False,
        ),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            "-f",
            metavar="FILE",
            help="The whole trigger as YAML, as one entry under triggers: in ember.yaml "
            "(- reads standard input); only --name may be given with it.",
            show_default=False,
        ),
    ] = None,
    allow_errors: Annotated[
        bool,
        typer.Option(
            "--allow-errors",
            help="Add it even when its configuration is wrong or its broker unreachable; it "
            "shows as failing.",
        ),
    ] = False,
    as_json: JsonFlag = False,
    namespace: Namespace = "default",
) -> None:
    """Add a trigger to a function: --type and its keys (--set), or -f FILE."""
    deliver = delivery(
        mode=None if mode is None else mode.value,
        concurrency=concurrency,
        order_by=order_by,
        batch_size=batch_size,
        batch_wait=batch_wait,
    )
    if batch_wait is not None and batch_size is None:
        raise typer.BadParameter("needs --batch-size", param_hint="--batch-wait")
    if file is not None:
        given = {"--type": type_, "--set": settings, "--filter": filters} | {
            "delivery options (--mode, --concurrency, …)": deliver or None
        }
        if flags := [flag for flag, value in given.items() if value]:
            raise typer.BadParameter(
                "the file gives the whole trigger; put these in it", param_hint=", ".join(flags)
            )
        trigger = read_trigger(file, sys.stdin)
        if name is not None:
            trigger["name"] = name
    elif type_ is None:
        raise typer.BadParameter(
            "missing; give the source's type (cron, nats, …), or the whole trigger with -f FILE",
            param_hint="--type",
        )
    else:
        trigger = build_trigger(type_, name, settings or [], filters or [], deliver)
    with _connect() as api:
        raw = api.add_trigger(function, namespace, trigger, allow_errors)
    _show_view(raw, as_json, "added")


@command("rm")
def rm(function: Function, trigger: TriggerName, namespace: Namespace = "default") -> None:
    """Remove a trigger: it stops taking events.

    One declared in ember.yaml comes back with the next deploy that lists it."""
    from ember.cli import client, render_triggers

    with _connect() as api:
        raw = api.remove_trigger(function, namespace, trigger)
    deleted = client.decode(raw, render_triggers.Deleted).deleted
    render.out().print(f"deleted trigger {deleted} of {function}", markup=False)


@command("pause")
def pause(
    function: Function,
    trigger: TriggerName,
    as_json: JsonFlag = False,
    namespace: Namespace = "default",
) -> None:
    """Pause a trigger: it takes no events (a durable broker keeps them) until resumed."""
    with _connect() as api:
        raw = api.trigger_action(function, namespace, trigger, "pause")
    _show_view(raw, as_json, "paused")


@command("resume")
def resume(
    function: Function,
    trigger: TriggerName,
    as_json: JsonFlag = False,
    namespace: Namespace = "default",
) -> None:
    """Resume a paused trigger."""
    with _connect() as api:
        raw = api.trigger_action(function, namespace, trigger, "resume")
    _show_view(raw, as_json, "resumed")


def _show_view(raw: bytes, as_json: bool, verb: str) -> None:
    from ember.cli import client, render_triggers

    if as_json:
        render.write_bytes(raw, newline=True)
        return
    view: render_triggers.TriggerView = client.decode(raw, render_triggers.TriggerView)
    render.out().print(render_triggers.summary(verb, view, time.time(), _server()))
