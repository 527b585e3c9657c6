"""Output for the CLI: Rich tables and lines for people, raw bytes and JSON for programs.

The builders are pure (they return renderables and take `now` where time matters); only
`write_*` and `print_error` touch the terminal. Text from the server is never parsed as markup.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime

import msgspec
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ember.errors import EmberError

# What the server answers. Unknown fields are ignored: an older CLI still reads a newer server.


class Scale(msgspec.Struct, frozen=True):
    min: int = 0
    max: int = 0
    idle: float = 0.0


class Spec(msgspec.Struct, frozen=True):
    handler: str = ""
    source: str = "."
    memory: int = 0
    timeout: float = 0.0
    concurrency: int = 1
    scale: Scale = Scale()
    env: dict[str, str] = {}
    network: str = "host"


class Instances(msgspec.Struct, frozen=True):
    idle: int = 0
    busy: int = 0
    starting: int = 0


class RevisionInfo(msgspec.Struct, frozen=True):
    number: int
    sha256: str
    created_at: float
    spec: Spec = Spec()
    changes: list[str] = []
    serving: bool = False
    aliases: list[str] = []


class RevisionList(msgspec.Struct, frozen=True):
    revisions: list[RevisionInfo]


class Alias(msgspec.Struct, frozen=True):
    name: str
    revision: int
    weight: int = 0


class Rollout(msgspec.Struct, frozen=True):
    from_revision: int
    to_revision: int
    weight: int
    step: int = 0
    every: float = 0.0
    max_error_rate: float = 0.0
    max_p99_ms: float = 0.0
    state: str = ""
    reason: str = ""
    next_at: float = 0.0
    requests: int = 0
    errors: int = 0


class Traffic(msgspec.Struct, frozen=True):
    serving: int
    previous: int = 0
    aliases: list[Alias] = []
    rollout: Rollout | None = None


class Autoscaler(msgspec.Struct, frozen=True):
    desired: int = 0
    panic: bool = False
    concurrency: float = 0.0
    keepalive: str = ""


class FunctionInfo(msgspec.Struct, frozen=True):
    name: str
    revision: int
    sha256: str
    created_at: float
    updated_at: float
    namespace: str = "default"
    spec: Spec = Spec()
    instances: Instances = Instances()
    zygote: bool = False
    url: str = ""
    autoscaler: Autoscaler = Autoscaler()


class FunctionDetail(FunctionInfo, frozen=True):
    revisions: list[RevisionInfo] = []
    traffic: Traffic | None = None


class FunctionList(msgspec.Struct, frozen=True):
    functions: list[FunctionInfo]


class LayerZygoteBrief(msgspec.Struct, frozen=True):
    memory_kb: int = 0


class LayerList(msgspec.Struct, frozen=True):
    count: int
    bytes: int
    zygotes: list[LayerZygoteBrief] = []


class LayerInfo(msgspec.Struct, frozen=True):
    digest: str
    packages: list[str] = []
    built: bool = False
    build_ms: float = 0.0


class Deployed(msgspec.Struct, frozen=True):
    name: str
    revision: int
    created: bool
    sha256: str = ""
    url: str = ""
    layer: LayerInfo | None = None


class DeployResult(msgspec.Struct, frozen=True):
    functions: list[Deployed]


class BuildInfo(msgspec.Struct, frozen=True):
    revision: int
    layer: str
    packages: list[str]
    bytes: int
    build_ms: float
    built: bool
    log: str
    created_at: float


class BuildList(msgspec.Struct, frozen=True):
    builds: list[BuildInfo]


class DeployProgress(msgspec.Struct, frozen=True, tag_field="event"):
    function: str
    phase: str
    packages: list[str] = []
    reused: bool = False
    bytes: int = 0
    ms: float = 0.0


class DeployDone(msgspec.Struct, frozen=True, tag_field="event"):
    status: int
    result: DeployResult


class _Error(msgspec.Struct, frozen=True):
    code: str
    message: str
    detail: str | None = None


class DeployFailed(msgspec.Struct, frozen=True, tag_field="event"):
    status: int
    error: _Error


DeployEvent = DeployProgress | DeployDone | DeployFailed


class LogEntry(msgspec.Struct, frozen=True):
    ts: float
    message: str
    stream: str = "log"
    id: int = 0
    function: str = ""
    revision: int = 0
    request_id: str | None = None
    instance: str | None = None


class Activation(msgspec.Struct, frozen=True):
    id: str | int
    start: float
    duration_ms: float
    status: int
    function: str = ""
    revision: int = 0
    tier: str = ""
    instance: str | None = None
    peak_memory_kb: int | None = None
    billed_ms: int | None = None
    error: str | None = None


class ActivationList(msgspec.Struct, frozen=True):
    activations: list[Activation]


class Scaled(msgspec.Struct, frozen=True):
    name: str
    instances: int


class InvocationAttempt(msgspec.Struct, frozen=True):
    number: int
    request_id: str | None = None
    started: float = 0.0
    duration_ms: float = 0.0
    status: int = 0
    outcome: str = ""  # ok | error | 5xx | 429 | timeout | crash | interrupted
    error: str | None = None


class InvocationRequest(msgspec.Struct, frozen=True):
    method: str = ""
    path: str = ""
    query: str = ""
    headers: list[tuple[str, str]] = []
    body: str = ""
    body_base64: bool = False


class InvocationResult(msgspec.Struct, frozen=True):
    status: int
    headers: list[tuple[str, str]] = []
    body: str = ""
    body_base64: bool = False


class Invocation(msgspec.Struct, frozen=True):
    """One async invocation, as GET /api/v1/invocations/{id} answers it."""

    id: str
    status: str  # queued | running | succeeded | failed | dead | expired | cancelled
    function: str = ""
    namespace: str = "default"
    accepted: float = 0.0
    not_before: float = 0.0
    ended: float = 0.0
    reason: str | None = None
    callback: str | None = None
    idempotency_key: str | None = None
    attempts: list[InvocationAttempt] = []
    request: InvocationRequest | None = None
    result: InvocationResult | None = None


class InvocationList(msgspec.Struct, frozen=True):
    invocations: list[Invocation]


class Accepted(msgspec.Struct, frozen=True):
    id: str
    status: str = "queued"


class Replayed(msgspec.Struct, frozen=True):
    replayed: list[str]


class Purged(msgspec.Struct, frozen=True):
    purged: int


_STREAM_STYLES = {"stderr": "red", "log": "cyan"}


def out() -> Console:
    return _console(stderr=False)


def err() -> Console:
    return _console(stderr=True)


def _console(*, stderr: bool) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = 1000  # piped: never truncate a column to 80 characters
    return console


def write_bytes(data: bytes, *, stderr: bool = False, newline: bool = False) -> None:
    """Write bytes untouched (a response body may be binary); `newline` ends a text line."""
    stream = sys.stderr if stderr else sys.stdout
    stream.flush()
    stream.buffer.write(data)
    if newline and not data.endswith(b"\n"):
        stream.buffer.write(b"\n")
    stream.buffer.flush()


def write_json(value: object) -> None:
    write_bytes(msgspec.json.encode(value), newline=True)


def error_text(exc: EmberError) -> Text:
    text = Text.assemble(("error: ", "bold red"), exc.message)
    if exc.detail:
        text.append("\n" + exc.detail.rstrip(), style="dim")
    return text


def print_error(exc: EmberError) -> None:
    err().print(error_text(exc), soft_wrap=True)


# Time.


def clock(ts: float) -> str:
    """Local wall-clock time with milliseconds: 'HH:MM:SS.mmm'."""
    moment = datetime.fromtimestamp(ts)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def ago(ts: float, now: float) -> str:
    delta = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{int(delta // size)}{unit} ago"
    return f"{int(delta)}s ago"


def until(ts: float, now: float) -> str:
    return "now" if ts <= now else "in " + ago(now, ts).removesuffix(" ago")


def seconds(value: float) -> str:
    return f"{value:g}s"


def millis(value: float) -> str:
    """A duration in ms, short: '0.42 ms', '87 ms', '30.0 s'."""
    if value >= 1000:
        return f"{value / 1000:.1f} s"
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


# Commands.


def deployed(fn: Deployed) -> Text:
    if not fn.created:
        return Text(f"{fn.name} unchanged (revision {fn.revision})", style="dim")
    line = Text.assemble(
        "deployed ", (fn.name, "bold"), f" revision {fn.revision} → ", (fn.url, "cyan")
    )
    if fn.layer is not None:
        layer = fn.layer
        how = "installed" if layer.built else "already installed"
        line.append(
            f"\n  requirements: {len(layer.packages)} package(s), {how}, layer "
            f"{layer.digest[:12]} ({millis(layer.build_ms)})",
            style="dim",
        )
    return line


def step(event: DeployProgress) -> str | None:
    """A finished step of a deploy, as one line; None for a step that is only starting."""
    name = event.function
    if event.phase == "resolved":
        how = "lock reused" if event.reused else f"resolved in {millis(event.ms)}"
        shown = ", ".join(event.packages[:6]) + (" …" if len(event.packages) > 6 else "")
        return f"{name}: {len(event.packages)} package(s), {how}: {shown}"
    if event.phase == "built":
        size = f"{event.bytes / (1024 * 1024):.1f} MB"
        shown = ", ".join(event.packages[:6]) + (" …" if len(event.packages) > 6 else "")
        return (
            f"{name}: built from source in the namespace's sandbox in {millis(event.ms)}, "
            f"{size}: {shown}"
        )
    if event.phase == "downloading" and event.packages:
        return f"{name}: downloading {event.packages[0]}, {event.bytes / (1024 * 1024):.1f} MB"
    if event.phase == "installed":
        size = f"{event.bytes / (1024 * 1024):.1f} MB"
        if event.reused:
            return f"{name}: layer already installed ({size}), nothing to install"
        return f"{name}: installed and compiled {size} in {millis(event.ms)}"
    return None


def doing(event: DeployProgress) -> str:
    """What the deploy is doing now, for the status line."""
    words = {
        "resolving": "resolving requirements",
        "resolved": "requirements resolved",
        "installing": f"downloading and installing {len(event.packages)} package(s)",
        "building": "building from source in a sandbox of the namespace",
        "installed": "requirements installed",
        "importing": "importing the handler in a new zygote",
    }
    return f"{event.function}: {words.get(event.phase, event.phase)} …"


def functions_table(functions: Sequence[FunctionInfo], now: float) -> RenderableType:
    if not functions:
        return Text("no functions deployed; try 'ember deploy DIR'", style="dim")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAMESPACE", "NAME", "REVISION", "MEMORY", "TIMEOUT", "CONCURRENCY", "SCALE"):
        table.add_column(column)
    table.add_column("INSTANCES(idle/busy)")
    table.add_column("UPDATED")
    for fn in functions:
        spec = fn.spec
        table.add_row(
            fn.namespace,
            Text(fn.name, style="bold"),
            str(fn.revision),
            f"{spec.memory} MB",
            seconds(spec.timeout),
            str(spec.concurrency),
            f"{spec.scale.min}-{spec.scale.max}",
            f"{fn.instances.idle}/{fn.instances.busy}",
            ago(fn.updated_at, now),
        )
    return table


def _spec_rows(spec: Spec) -> list[tuple[str, str]]:
    scale = spec.scale
    env = ", ".join(f"{key}={value}" for key, value in sorted(spec.env.items()))
    return [
        ("handler", f"{spec.handler} (source {spec.source})"),
        ("memory", f"{spec.memory} MB"),
        ("timeout", seconds(spec.timeout)),
        ("concurrency", str(spec.concurrency)),
        ("scale", f"min {scale.min}, max {scale.max}, idle {seconds(scale.idle)}"),
        ("env", env or "-"),
        ("network", spec.network),
    ]


def describe(fn: FunctionDetail, now: float) -> RenderableType:
    inst = fn.instances
    rows = [
        ("url", fn.url),
        ("revision", f"{fn.revision} (sha256 {fn.sha256[:12]})"),
        ("created", f"{stamp(fn.created_at)} ({ago(fn.created_at, now)})"),
        ("updated", f"{stamp(fn.updated_at)} ({ago(fn.updated_at, now)})"),
        *_spec_rows(fn.spec),
        ("instances", f"{inst.idle} idle, {inst.busy} busy, {inst.starting} starting"),
        ("autoscaler", _autoscaler(fn.autoscaler)),
        ("zygote", "warm" if fn.zygote else "none"),
        *_traffic_rows(fn.traffic, now),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, Text(value))
    return Group(Text(fn.name, style="bold"), grid, Text(), revisions_table(fn.revisions))


def _autoscaler(a: Autoscaler) -> str:
    panic = ", PANIC" if a.panic else ""
    return f"desired {a.desired}{panic}, mean concurrency {a.concurrency:g}; zygote {a.keepalive}"


def _traffic_rows(traffic: Traffic | None, now: float) -> list[tuple[str, str]]:
    if traffic is None:
        return []
    split = [a for a in traffic.aliases if a.weight]
    if split:
        routed = ", ".join(f"{a.name}={a.revision}:{a.weight}%" for a in split)
    else:
        routed = f"all to revision {traffic.serving}"
    rows = [("traffic", routed)]
    pointers = [a for a in traffic.aliases if not a.weight]
    if pointers:
        rows.append(("aliases", ", ".join(f"{a.name}={a.revision}" for a in pointers)))
    if traffic.previous:
        rows.append(("rollback to", str(traffic.previous)))
    r = traffic.rollout
    if r is not None:
        text = (
            f"{r.state}: {r.from_revision} -> {r.to_revision} at {r.weight}% (+{r.step}% every "
            f"{seconds(r.every)}, max error rate {r.max_error_rate:.1%}"
            + (f", max p99 {r.max_p99_ms:g} ms" if r.max_p99_ms else "")
            + f"); canary served {r.requests} requests, {r.errors} errors"
        )
        if r.state == "running":
            text += f"; next step in {max(0.0, r.next_at - now):.0f} s"
        if r.reason:
            text += f"; {r.reason}"
        rows.append(("rollout", text))
    return rows


def revisions_table(revs: Sequence[RevisionInfo]) -> Table:
    table = Table(
        box=None, pad_edge=False, header_style="bold", title="revisions", title_justify="left"
    )
    for column in ("REVISION", "CREATED", "SERVES", "SHA256", "CHANGES"):
        table.add_column(column)
    for rev in sorted(revs, key=lambda r: r.number, reverse=True):
        serves = ", ".join((["serving"] if rev.serving else []) + rev.aliases)
        table.add_row(
            str(rev.number),
            stamp(rev.created_at),
            Text(serves or "-"),
            rev.sha256[:12],
            Text("; ".join(rev.changes)),
        )
    return table


def builds_table(builds: Sequence[BuildInfo], now: float) -> RenderableType:
    if not builds:
        return Text("no builds: no kept revision has requirements", style="dim")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("REVISION", "LAYER", "PACKAGES", "SIZE", "TIME", "INSTALLED", "WHEN"):
        table.add_column(column)
    for b in builds:
        table.add_row(
            str(b.revision),
            b.layer[:12],
            Text(", ".join(b.packages)),
            f"{b.bytes / (1024 * 1024):.1f} MB",
            millis(b.build_ms),
            "yes" if b.built else "no (was there)",
            ago(b.created_at, now),
        )
    return table


def build_logs(builds: Sequence[BuildInfo]) -> Text:
    out = Text()
    for b in builds:
        out.append(f"revision {b.revision}, layer {b.layer[:12]}\n", style="bold")
        out.append(b.log.rstrip() + "\n\n")
    return out if builds else Text("no builds", style="dim")


def traffic_text(traffic: Traffic, now: float) -> Text:
    return Text("\n".join(f"{key}: {value}" for key, value in _traffic_rows(traffic, now)))


def log_line(entry: LogEntry) -> Text:
    """'HH:MM:SS.mmm request_id[:8] stream message'."""
    request = (entry.request_id or "-")[:8].ljust(8)
    return Text.assemble(
        (clock(entry.ts), "dim"),
        " ",
        (request, "magenta"),
        " ",
        (entry.stream.ljust(6), _STREAM_STYLES.get(entry.stream, "")),
        " ",
        entry.message.rstrip("\n"),
    )


def activations_table(activations: Sequence[Activation]) -> RenderableType:
    if not activations:
        return Text("no activations yet", style="dim")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("START", "ID", "REV", "STATUS", "TIER", "DURATION", "BILLED", "MEMORY"):
        table.add_column(column, no_wrap=True)
    table.add_column("ERROR")
    for act in activations:
        table.add_row(
            clock(act.start),
            Text(str(act.id)[:8]),
            str(act.revision),
            Text(str(act.status), style="green" if act.status < 400 else "red"),
            Text(act.tier),
            millis(act.duration_ms),
            "-" if act.billed_ms is None else f"{act.billed_ms} ms",
            "-" if act.peak_memory_kb is None else f"{act.peak_memory_kb / 1024:.1f} MB",
            Text(act.error or "", style="red"),
        )
    return table


_STATUS_STYLES = {
    "queued": "cyan",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "dead": "bold red",
    "expired": "magenta",
    "cancelled": "dim",
}
BODY_SHOWN = 4000  # characters of a body the detail view shows; --json has it all


def status_text(status: str) -> Text:
    return Text(status, style=_STATUS_STYLES.get(status, ""))


def body_bytes(body: str, is_base64: bool) -> bytes:
    """A request's or result's body as it was: JSON carries binary ones base64-encoded."""
    return base64.b64decode(body) if is_base64 else body.encode()


def body_text(data: bytes) -> Text:
    """A body for people: its text (the first `BODY_SHOWN` characters), or its size if binary."""
    if not data:
        return Text("(empty body)", style="dim")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Text(f"({len(data)} bytes of binary data; --json shows them base64)", style="dim")
    shown = Text(text[:BODY_SHOWN].rstrip("\n"))
    if len(text) > BODY_SHOWN:
        shown.append(f"\n… {len(text) - BODY_SHOWN} more characters; --json shows all", "dim")
    return shown


def invocations_table(
    invocations: Sequence[Invocation], now: float, empty: str = "no async invocations"
) -> RenderableType:
    """ID (8 characters), status, attempts, accepted, the last attempt's duration, the result's
    HTTP status and why it ended, newest first as the server lists them."""
    if not invocations:
        return Text(empty, style="dim")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "STATUS", "ATTEMPTS", "ACCEPTED", "DURATION", "RESULT"):
        table.add_column(column, no_wrap=True)
    table.add_column("REASON")
    for inv in invocations:
        last = inv.attempts[-1] if inv.attempts else None
        table.add_row(
            inv.id[:8],
            status_text(inv.status),
            str(len(inv.attempts)),
            ago(inv.accepted, now),
            "-" if last is None else millis(last.duration_ms),
            "-" if inv.result is None else str(inv.result.status),
            Text(inv.reason or ""),
        )
    return table


def attempt_line(attempt: InvocationAttempt) -> Text:
    """'#N HH:MM:SS.mmm OUTCOME STATUS DURATION request ID[:8] [ERROR]', columns aligned."""
    line = Text.assemble(
        f"#{attempt.number:<3}",
        (clock(attempt.started), "dim"),
        "  ",
        (attempt.outcome.ljust(11), "green" if attempt.outcome == "ok" else "red"),
        f"  {attempt.status:>3}  {millis(attempt.duration_ms):>8}",
        "  request ",
        ((attempt.request_id or "-")[:8], "magenta"),
    )
    if attempt.error:
        line.append(f"  {attempt.error}", style="red")
    return line


def invocation_detail(inv: Invocation, now: float, *, request: bool = False) -> RenderableType:
    """An invocation: status, why it ended, when, each attempt, (`request`: what was sent,) then
    the result's status and body."""
    rows: list[tuple[str, Text]] = [
        ("function", Text(f"{inv.function} (namespace {inv.namespace})")),
        ("status", status_text(inv.status)),
    ]
    if inv.reason:
        rows.append(("reason", Text(inv.reason)))
    rows.append(("accepted", Text(f"{stamp(inv.accepted)} ({ago(inv.accepted, now)})")))
    if inv.status == "queued" and inv.not_before > now:
        next_at = f"{stamp(inv.not_before)} ({until(inv.not_before, now)})"
        rows.append(("next attempt", Text(next_at)))
    if inv.ended:
        rows.append(("ended", Text(f"{stamp(inv.ended)} ({ago(inv.ended, now)})")))
    if inv.callback:
        rows.append(("callback", Text(inv.callback)))
    if inv.idempotency_key:
        rows.append(("idempotency key", Text(inv.idempotency_key)))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, value)
    parts: list[RenderableType] = [Text(f"invocation {inv.id}", style="bold"), grid, Text()]
    if inv.attempts:
        parts.append(Text(f"attempts ({len(inv.attempts)})", style="bold"))
        parts.extend(attempt_line(a) for a in inv.attempts)
    else:
        parts.append(Text("no attempts yet", style="dim"))
    if request and inv.request is not None:
        sent = inv.request
        target = (sent.path or "/") + (f"?{sent.query}" if sent.query else "")
        parts += [Text(), Text.assemble(("request", "bold"), f"  {sent.method} {target}")]
        parts.extend(Text(f"{name}: {value}", style="dim") for name, value in sent.headers)
        parts.append(body_text(body_bytes(sent.body, sent.body_base64)))
    parts.append(Text())
    if inv.result is None:
        parts.append(Text.assemble(("result", "bold"), ("  none", "dim")))
    else:
        result = inv.result
        parts.append(Text.assemble(("result", "bold"), f"  HTTP {result.status}"))
        parts.append(body_text(body_bytes(result.body, result.body_base64)))
    return Group(*parts)


def waiting(inv: Invocation) -> str:
    """The status line while `--wait` polls."""
    tried = f", {len(inv.attempts)} attempt(s)" if inv.attempts else ""
    return f"waiting for {inv.id[:8]}: {inv.status}{tried} …"


def doctor_table(rows: Sequence[tuple[str, bool, str]]) -> Table:
    table = Table(box=None, pad_edge=False, show_header=False)
    for _ in range(3):
        table.add_column()
    for name, ok, detail in rows:
        mark = Text("✓", style="green") if ok else Text("✗", style="red")
        table.add_row(mark, Text(name, style="bold"), Text(detail))
    return table


def invocation_summary(status: int, headers: Mapping[str, str], body: bytes) -> dict[str, object]:
    """What `ember invoke --json` prints: status, headers, body (text or base64), Ember headers."""
    lower = {key.lower(): value for key, value in headers.items()}
    revision = lower.get("x-ember-revision", "")
    try:
        text, is_base64 = body.decode("utf-8"), False
    except UnicodeDecodeError:
        text, is_base64 = base64.b64encode(body).decode("ascii"), True
    return {
        "status": status,
        "headers": dict(headers),
        "body": text,
        "body_base64": is_base64,
        "request_id": lower.get("x-ember-request-id"),
        "revision": int(revision) if revision.isdigit() else None,
        "start": lower.get("x-ember-start"),
    }


class NewKey(msgspec.Struct, frozen=True):
    id: str
    key: str
    scopes: list[str]


class KeyInfo(msgspec.Struct, frozen=True):
    id: str
    name: str
    scopes: list[str]
    rate: float = 0.0
    burst: int = 0
    created_at: float = 0.0
    revoked_at: float | None = None


class KeyList(msgspec.Struct, frozen=True):
    keys: list[KeyInfo]


class SecretList(msgspec.Struct, frozen=True):
    namespace: str
    names: list[str]


class Quota(msgspec.Struct, frozen=True):
    functions: int = 0
    instances: int = 0
    memory_mb: int = 0


class NamespaceInfo(msgspec.Struct, frozen=True):
    name: str
    quota: Quota = Quota()
    uid: int = 0


class NamespaceList(msgspec.Struct, frozen=True):
    namespaces: list[NamespaceInfo]


def keys_table(keys: Sequence[KeyInfo], now: float) -> RenderableType:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "NAME", "SCOPES", "RATE", "CREATED", "STATE"):
        table.add_column(column)
    for key in keys:
        rate = f"{key.rate:g}/s burst {key.burst}" if key.rate else "unlimited"
        state = "revoked" if key.revoked_at else "active"
        table.add_row(key.id, key.name, " ".join(key.scopes), rate, ago(key.created_at, now), state)
    return table


def namespaces_table(namespaces: Sequence[NamespaceInfo]) -> RenderableType:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAMESPACE", "UID", "MAX FUNCTIONS", "MAX INSTANCES", "MAX MEMORY"):
        table.add_column(column)
    for ns in namespaces:
        q = ns.quota
        table.add_row(
            ns.name,
            str(ns.uid),
            str(q.functions or "-"),
            str(q.instances or "-"),
            f"{q.memory_mb} MB" if q.memory_mb else "-",
        )
    return table
