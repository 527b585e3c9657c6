"""The `ember` command: a Typer app that talks HTTP to an Ember server.

This is the only place in Ember that reads environment variables: `EMBER_URL` (the server to
talk to) and `EMBER_HOME` (the state directory of `ember up`). httpx, the server and the bundler
are imported inside the commands so that `ember --help` stays fast.
"""

import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import msgspec
import typer
from rich.console import RenderableType

from ember.cli import render
from ember.config import ServerConfig
from ember.errors import EmberError, PlatformError

if TYPE_CHECKING:
    from ember.cli import client

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8080"
# The only variables of the server's environment that reach functions (docs/functions.md).
PASSED_ENV = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "HOME",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
)
DEFAULT_HOME = "~/.ember"
API_TIMEOUT = 30.0
DEPLOY_TIMEOUT = 120.0

app = typer.Typer(
    name="ember",
    help="Ember: Python functions on your own machine that start from zero in milliseconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Name = Annotated[str, typer.Argument(help="Function name.", show_default=False)]


def main() -> None:
    """Entry point of the `ember` script."""
    app(prog_name="ember")


def command(fn: Callable[P, None]) -> Callable[P, None]:
    """Register `fn` as a subcommand; an `EmberError` becomes 'error: …' and its exit code."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except EmberError as exc:
            render.print_error(exc)
            raise typer.Exit(exc.exit_code) from None

    app.command()(run)
    return run


# Environment.


def server_url() -> str:
    return os.environ.get("EMBER_URL") or DEFAULT_URL


def ember_home() -> Path:
    return Path(os.environ.get("EMBER_HOME") or DEFAULT_HOME).expanduser()


def server_default(field: str) -> Any:
    """`ServerConfig`'s default for `field`, so defaults live in one place."""
    return next(f.default for f in msgspec.structs.fields(ServerConfig) if f.name == field)


# Commands.


def api_key() -> str | None:
    """EMBER_KEY, else the admin key `ember up` wrote to EMBER_HOME/credentials."""
    key = os.environ.get("EMBER_KEY")
    if key:
        return key.strip()
    try:
        return (ember_home() / "credentials").read_text().strip() or None
    except OSError:
        return None


def _connect(timeout: float | None = API_TIMEOUT) -> "client.Client":
    from ember.cli import client

    return client.Client(server_url(), timeout=timeout, key=api_key())


Namespace = Annotated[
    str,
    typer.Option(
        "--namespace",
        "--ns",
        envvar="EMBER_NAMESPACE",
        help="Namespace (tenant). Default: $EMBER_NAMESPACE or 'default'.",
    ),
]


def _show(raw: bytes, as_json: bool, type_: type[T], view: Callable[[T], RenderableType]) -> None:
    from ember.cli import client

    if as_json:
        render.write_bytes(raw, newline=True)
    else:
        render.out().print(view(client.decode(raw, type_)))


@command
def up(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = server_default("host"),
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = server_default("port"),
    home: Annotated[
        Path | None,
        typer.Option(help="State directory. Default: $EMBER_HOME or ~/.ember.", show_default=False),
    ] = None,
    deploy: Annotated[
        list[Path] | None,
        typer.Option(help="Deploy this directory once started; repeatable.", file_okay=False),
    ] = None,
    queue_depth: Annotated[
        int, typer.Option(help="Waiting requests per revision before 429.")
    ] = server_default("queue_depth"),
    grace: Annotated[
        float, typer.Option(help="Seconds in-flight requests get on shutdown.")
    ] = server_default("grace_period"),
    init_timeout: Annotated[
        float, typer.Option(help="Seconds a function's module may take to import.")
    ] = server_default("init_timeout"),
    zygote_keepalive: Annotated[
        float, typer.Option(help="Seconds an unused function zygote stays warm.")
    ] = server_default("zygote_keepalive"),
    memory_budget: Annotated[
        int,
        typer.Option(
            help="MB that instances and zygotes may use on this node (0: 80 % of the RAM)."
        ),
    ] = server_default("memory_budget_mb"),
    budget_wait: Annotated[
        float, typer.Option(help="Seconds a start may wait for memory before 429.")
    ] = server_default("budget_wait"),
    revision_retention: Annotated[
        int, typer.Option(help="Revisions kept per function (aliases keep theirs too).")
    ] = server_default("revision_retention"),
    max_connections: Annotated[
        int, typer.Option(help="Open HTTP connections; one more is answered 503 and closed.")
    ] = server_default("max_connections"),
    max_buffered_mb: Annotated[
        int,
        typer.Option(help="MB of request bodies held in memory at once; beyond, 503."),
    ] = server_default("max_buffered_bytes") // (1024 * 1024),
    head_timeout: Annotated[
        float, typer.Option(help="Seconds a request's line and headers may take (then 408).")
    ] = server_default("head_timeout"),
    require_isolation: Annotated[
        bool,
        typer.Option(
            "--require-isolation",
            help="Refuse to start unless every protection (`ember doctor`) is available.",
        ),
    ] = False,
    sandbox: Annotated[
        str,
        typer.Option(
            help="auto: the root sandbox when privileged, else user namespaces; userns: user "
            "namespaces even as root; off: rlimits only.",
        ),
    ] = server_default("sandbox"),
    no_sandbox: Annotated[
        bool, typer.Option("--no-sandbox", help="Same as --sandbox off.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = server_default(
        "log_level"
    ),
    index_url: Annotated[
        str, typer.Option(help="Package index that functions' requirements come from (PyPI).")
    ] = server_default("index_url"),
    extra_index_url: Annotated[
        list[str] | None, typer.Option(help="Another package index; repeatable.")
    ] = None,
    find_links: Annotated[
        list[str] | None,
        typer.Option(help="A directory or page of wheels to install from; repeatable."),
    ] = None,
    no_index: Annotated[
        bool, typer.Option("--no-index", help="Install from --find-links only.")
    ] = False,
    offline: Annotated[
        bool,
        typer.Option("--offline", help="Builds use no network: the cache and --find-links only."),
    ] = False,
    package_cache: Annotated[
        Path | None,
        typer.Option(
            help="Directory of downloaded packages, shareable between servers. "
            "Default: EMBER_HOME/layers/.cache.",
            show_default=False,
        ),
    ] = None,
    build_timeout: Annotated[
        float, typer.Option(help="Seconds a requirements resolution or install may take.")
    ] = server_default("build_timeout"),
    max_layer_mb: Annotated[
        int, typer.Option(help="MB one function's installed requirements may take.")
    ] = server_default("max_layer_mb"),
    no_source_builds: Annotated[
        bool,
        typer.Option(
            "--no-source-builds",
            help="Refuse requirements only source distributions satisfy (no sandboxed builds).",
        ),
    ] = False,
    build_memory_mb: Annotated[
        int, typer.Option(help="MB of memory a sandboxed build from source may use.")
    ] = server_default("build_memory_mb"),
    build_disk_mb: Annotated[
        int, typer.Option(help="MB of disk (its private /tmp) a sandboxed build may use.")
    ] = server_default("build_disk_mb"),
    layer_zygotes: Annotated[
        int,
        typer.Option(
            help="Layer zygotes kept at most (a function's requirements imported once, new "
            "revisions fork from it); 0: none."
        ),
    ] = server_default("layer_zygotes"),
    layer_zygote_keepalive: Annotated[
        float,
        typer.Option(
            help="Seconds a layer zygote no function zygote uses is kept while its function "
            "is deployed."
        ),
    ] = server_default("layer_zygote_keepalive"),
) -> None:
    """Run an Ember server in the foreground until Ctrl-C or SIGTERM."""
    from ember.server.main import serve

    config = ServerConfig(
        home=(home or ember_home()).resolve(),
        host=host,
        port=port,
        queue_depth=queue_depth,
        grace_period=grace,
        init_timeout=init_timeout,
        zygote_keepalive=zygote_keepalive,
        memory_budget_mb=memory_budget,
        budget_wait=budget_wait,
        revision_retention=revision_retention,
        max_connections=max_connections,
        max_buffered_bytes=max_buffered_mb * 1024 * 1024,
        head_timeout=head_timeout,
        log_level=log_level,
        sandbox="off" if no_sandbox else sandbox,
        require_isolation=require_isolation,
        index_url=index_url,
        extra_index_urls=list(extra_index_url or []),
        find_links=[_absolute_link(link) for link in find_links or []],
        no_index=no_index,
        offline=offline,
        package_cache=str(package_cache.resolve()) if package_cache else "",
        build_timeout=build_timeout,
        max_layer_mb=max_layer_mb,
        source_builds=not no_source_builds,
        build_memory_mb=build_memory_mb,
        build_disk_mb=build_disk_mb,
        layer_zygotes=layer_zygotes,
        layer_zygote_keepalive=layer_zygote_keepalive,
        base_env={k: v for k, v in os.environ.items() if k in PASSED_ENV},
    ).validate()
    raise typer.Exit(serve(config, list(deploy or [])))


def _absolute_link(link: str) -> str:
    """A wheelhouse given as a relative path is the operator's, relative to where `up` ran."""
    return link if "://" in link else str(Path(link).resolve())


@command
def deploy(
    directory: Annotated[
        Path, typer.Argument(help="Directory to pack and deploy.", exists=True, file_okay=False)
    ],
    name: Annotated[
        str | None, typer.Option(help="Function name. Default: the directory's name.")
    ] = None,
    namespace: Namespace = "default",
    canary: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=99,
            help="Roll out gradually: the new revision starts with this % of the traffic.",
            show_default=False,
        ),
    ] = None,
    step: Annotated[int, typer.Option(min=1, max=100, help="Rollout: % added per step.")] = 10,
    every: Annotated[str, typer.Option(help="Rollout: time per step, e.g. 30s, 1m.")] = "1m",
    max_error_rate: Annotated[
        str, typer.Option(help="Rollout: the canary's 5xx share that rolls back, e.g. 1%.")
    ] = "1%",
    max_p99: Annotated[
        str | None,
        typer.Option(help="Rollout: the canary's p99 latency that rolls back, e.g. 500ms."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only the outcome: no progress.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the outcome as JSON; no progress.")
    ] = False,
) -> None:
    """Pack a directory (honouring .emberignore) and deploy the functions in it. Progress
    (requirements resolved, installed, the import) goes to stderr as it happens."""
    from ember.bundle import pack, read_manifest
    from ember.cli import client
    from ember.manifest import load_manifest

    name = name or client.default_name(directory)
    load_manifest(read_manifest(directory), name)  # a bad ember.yaml fails before the upload
    params = {"name": name, "namespace": namespace}
    if canary is not None:
        params |= {
            "canary": str(canary),
            "step": str(step),
            "every": str(client.parse_duration(every)),
            "max_error_rate": str(client.parse_percent(max_error_rate, "--max-error-rate")),
            "max_p99_ms": str(client.parse_duration(max_p99) * 1000 if max_p99 else 0),
        }
    result = _deploy_streamed(params, pack(directory), show=not (quiet or as_json))
    if as_json:
        render.write_json(result)
        return
    console = render.out()
    for fn in result.functions:
        console.print(render.deployed(fn))


def _deploy_streamed(params: dict[str, str], bundle: bytes, show: bool) -> render.DeployResult:
    """Post the bundle asking for the deploy's steps as they happen; with `show`, each finished
    step is a line on stderr (and, in a terminal, a status line says what runs now). The
    outcome, or its error."""
    from ember.cli import client

    headers = [("Content-Type", "application/gzip"), ("Accept", "application/x-ndjson")]
    last: render.DeployDone | render.DeployFailed | None = None
    err = render.err()
    with (
        _connect(DEPLOY_TIMEOUT) as api,
        api.stream_lines(
            "/api/v1/deploy", params=params, method="POST", content=bundle, headers=headers
        ) as lines,
        err.status("uploading …")
        if show and err.is_terminal
        else contextlib.nullcontext() as status,
    ):
        for line in lines:
            if not line:
                continue
            event: render.DeployEvent = client.decode(line, render.DeployEvent)  # type: ignore[arg-type]
            if not isinstance(event, render.DeployProgress):
                last = event
            elif show:
                if (done := render.step(event)) is not None:
                    err.print(done, style="dim", markup=False)
                if status is not None:
                    status.update(render.doing(event))
    if last is None:
        raise PlatformError("the server ended the deploy without an outcome", code="transport")
    if isinstance(last, render.DeployFailed):
        raise client.error_class(last.status, last.error.code)(
            last.error.message, code=last.error.code, status=last.status, detail=last.error.detail
        )
    return last.result


@command
def invoke(
    name: Name,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Body: a string, @FILE, or @- for stdin.")
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", "-X", help="Default: POST with --data, else GET.")
    ] = None,
    path: Annotated[str, typer.Option(help="Sub-path (and query) after /fn/NAME.")] = "",
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="'Name: value'; repeatable.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print status, headers, body and Ember headers as JSON.")
    ] = False,
    namespace: Namespace = "default",
) -> None:
    """Call a function over HTTP and print its response body."""
    from ember.cli import client

    body = client.parse_data(data, sys.stdin.buffer)
    verb = client.choose_method(method, body is not None)
    headers = [client.parse_header(h) for h in header or []]
    with _connect(timeout=None) as api:  # the server enforces the function's own timeout
        fn_path = client.function_path(name, path, namespace)
        resp = api.invoke(verb, fn_path, content=body, headers=headers)
    code = client.invoke_exit_code(resp.status_code, resp.content)
    if as_json:
        render.write_json(render.invocation_summary(resp.status_code, resp.headers, resp.content))
    elif code == 0:
        render.write_bytes(resp.content)
    elif client.ember_error(resp.content) is not None:
        raise client.error_from_response(resp.status_code, resp.content)
    else:
        render.write_bytes(resp.content, stderr=True)
    raise typer.Exit(code)


@command
def ls(
    as_json: JsonFlag = False,
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "--ns", help="Only this namespace. Default: all you may read."),
    ] = None,
) -> None:
    """List deployed functions."""

    with _connect() as api:
        raw = api.fetch(
            "GET", "/api/v1/functions", params={"namespace": namespace} if namespace else None
        )
    _show(
        raw,
        as_json,
        render.FunctionList,
        lambda r: render.functions_table(r.functions, time.time()),
    )


@command
def describe(name: Name, as_json: JsonFlag = False, namespace: Namespace = "default") -> None:
    """Show a function's spec, instances and revisions."""
    from ember.cli import client

    with _connect() as api:
        raw = api.fetch("GET", client.api_path(name), params={"namespace": namespace})
    _show(raw, as_json, render.FunctionDetail, lambda fn: render.describe(fn, time.time()))


@command
def rm(name: Name, namespace: Namespace = "default") -> None:
    """Delete a function and all its revisions."""
    from ember.cli import client

    with _connect() as api:
        api.fetch("DELETE", client.api_path(name), params={"namespace": namespace})
    render.out().print(f"deleted {name}", markup=False)


@command
def logs(
    name: Name,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming.")] = False,
    since: Annotated[
        str | None, typer.Option(help="A duration back (30s, 10m, 1h) or a unix timestamp.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many lines.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw JSON lines.")] = False,
    namespace: Namespace = "default",
) -> None:
    """Print a function's log lines; with -f, keep streaming until Ctrl-C."""
    from ember.cli import client

    params = {**client.log_params(since, follow, limit, time.time()), "namespace": namespace}
    console = render.out()
    if follow:
        signal.signal(signal.SIGINT, _stop_following)
    try:
        with (
            _connect(timeout=None if follow else API_TIMEOUT) as api,
            api.stream_lines(client.api_path(name, "logs"), params=params) as lines,
        ):
            for line in lines:
                if not line.strip():
                    continue
                if as_json:
                    render.write_bytes(line.encode(), newline=True)
                else:
                    entry = client.decode(line, render.LogEntry)
                    console.print(render.log_line(entry), soft_wrap=True)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _stop_following(signum: int, frame: object) -> None:
    """Ctrl-C ends `logs -f` at once, exit status 0. Not by a KeyboardInterrupt: raised at an
    unlucky point inside the HTTP client it can leave the client unable to close, and in one CI
    run under load the CLI hung after Ctrl-C (test_logs_follow_streams_new_lines)."""
    try:
        sys.stdout.flush()  # every line is flushed as it is written; this is only a courtesy
    except (OSError, RuntimeError):  # a write the signal interrupted
        pass
    os._exit(0)


@command
def activations(
    name: Name,
    limit: Annotated[int, typer.Option(min=1, help="Most recent activations to show.")] = 20,
    as_json: JsonFlag = False,
    namespace: Namespace = "default",
) -> None:
    """Show a function's recent invocations: status, tier, duration, memory."""
    from ember.cli import client

    with _connect() as api:
        raw = api.fetch(
            "GET",
            client.api_path(name, "activations"),
            params={"limit": str(limit), "namespace": namespace},
        )
    _show(raw, as_json, render.ActivationList, lambda r: render.activations_table(r.activations))


@command
def scale(
    name: Name,
    instances: Annotated[
        int, typer.Option("--instances", "-n", min=0, help="Instances to keep.", show_default=False)
    ],
    namespace: Namespace = "default",
) -> None:
    """Set how many instances a function keeps running."""
    from ember.cli import client

    with _connect() as api:
        raw = api.fetch(
            "POST",
            client.api_path(name, "scale"),
            json={"instances": instances},
            params={"namespace": namespace},
        )
    scaled = client.decode(raw, render.Scaled)
    render.out().print(f"{scaled.name} scaled to {scaled.instances} instances", markup=False)


@command
def revisions(name: Name, as_json: JsonFlag = False, namespace: Namespace = "default") -> None:
    """List a function's revisions: what changed in each, which serve and which aliases."""
    from ember.cli import client

    with _connect() as api:
        raw = api.fetch("GET", client.api_path(name, "revisions"), params={"namespace": namespace})
    _show(raw, as_json, render.RevisionList, lambda r: render.revisions_table(r.revisions))


@command
def builds(
    name: Name,
    log: Annotated[bool, typer.Option("--log", help="Each build's log, newest first.")] = False,
    as_json: JsonFlag = False,
    namespace: Namespace = "default",
) -> None:
    """How a function's kept revisions got their requirements: lock, packages, size, time."""
    from ember.cli import client

    with _connect() as api:
        raw = api.fetch("GET", client.api_path(name, "builds"), params={"namespace": namespace})
    if log and not as_json:
        render.out().print(render.build_logs(client.decode(raw, render.BuildList).builds))
        return
    _show(raw, as_json, render.BuildList, lambda r: render.builds_table(r.builds, time.time()))


@command
def traffic(
    name: Name,
    aliases: Annotated[
        list[str],
        typer.Argument(
            help="ALIAS=REVISION[:WEIGHT] ...; weights add up to 100 (or all 0 to only name "
            "revisions), e.g. stable=3:90 canary=4:10. Reach one with /fn/NAME@ALIAS.",
            show_default=False,
        ),
    ],
    as_json: JsonFlag = False,
    namespace: Namespace = "default",
) -> None:
    """Split a function's traffic across revisions by named aliases."""
    from ember.cli import client

    body = {"aliases": [client.parse_alias(a) for a in aliases]}
    with _connect(DEPLOY_TIMEOUT) as api:
        raw = api.fetch(
            "PUT", client.api_path(name, "traffic"), json=body, params={"namespace": namespace}
        )
    _show(raw, as_json, render.Traffic, lambda t: render.traffic_text(t, time.time()))


@command
def rollback(
    name: Name,
    to: Annotated[
        int,
        typer.Option(
            min=0,
            help="Revision to go back to. Default: the rollout's stable one, else the previous.",
            show_default=False,
        ),
    ] = 0,
    as_json: JsonFlag = False,
    namespace: Namespace = "default",
) -> None:
    """Move all traffic back to one revision in one step."""
    from ember.cli import client

    with _connect(DEPLOY_TIMEOUT) as api:
        raw = api.fetch(
            "POST",
            client.api_path(name, "rollback"),
            json={"to": to},
            params={"namespace": namespace},
        )
    _show(raw, as_json, render.Traffic, lambda t: render.traffic_text(t, time.time()))


@command
def doctor(
    as_json: JsonFlag = False,
    sandbox: Annotated[str, typer.Option(help="Probe this sandbox setting.")] = "auto",
) -> None:
    """Check this host's isolation features and whether an Ember server is reachable."""
    from ember.cli import client
    from ember.pool.capabilities import detect

    checks = [(check.name, check.ok, check.detail) for check in detect(sandbox)]
    url = server_url()
    reachable, detail = client.probe(url)
    layers: render.LayerList | None = None
    if reachable:  # what the server's functions' requirements take on its disk (admin key)
        try:
            with _connect() as api:
                layers = client.decode(api.fetch("GET", "/api/v1/layers"), render.LayerList)
        except EmberError:
            layers = None
    if as_json:
        found = [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks]
        server = {"url": url, "reachable": reachable, "detail": detail}
        out: dict[str, object] = {"checks": found, "server": server}
        if layers is not None:
            out["layers"] = {
                "count": layers.count,
                "bytes": layers.bytes,
                "zygotes": len(layers.zygotes),
                "zygotes_kb": sum(z.memory_kb for z in layers.zygotes),
            }
        render.write_json(out)
        return
    table = [*checks, ("server", reachable, detail)]
    if layers is not None:
        table.append(
            (
                "layers",
                True,
                f"{layers.count} layer(s) of installed requirements, "
                f"{layers.bytes / (1024 * 1024):.1f} MB on the server's disk; "
                f"{len(layers.zygotes)} layer zygote(s) running, "
                f"{sum(z.memory_kb for z in layers.zygotes) / 1024:.1f} MB measured",
            )
        )
    render.out().print(render.doctor_table(table))


# Keys, secrets, namespaces and quotas.

keys_app = typer.Typer(help="API keys: create (shown once), list, revoke. Needs an admin key.")
secrets_app = typer.Typer(help="Secrets of a namespace, encrypted at rest; values are write-only.")
quota_app = typer.Typer(help="Quotas of a namespace (admin).")
app.add_typer(keys_app, name="keys")
app.add_typer(secrets_app, name="secrets")
app.add_typer(quota_app, name="quota")


def subcommand(group: typer.Typer, name: str) -> Callable[[Callable[P, None]], Callable[P, None]]:
    def register(fn: Callable[P, None]) -> Callable[P, None]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                fn(*args, **kwargs)
            except EmberError as exc:
                render.print_error(exc)
                raise typer.Exit(exc.exit_code) from None

        group.command(name)(run)
        return run

    return register


@subcommand(keys_app, "create")
def keys_create(
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope", help="admin, deploy:NS, invoke:NS or read:NS (NS may be *); repeatable."
        ),
    ],
    name: Annotated[str, typer.Option(help="A label for listings.")] = "",
    rate: Annotated[float, typer.Option(min=0, help="Requests per second; 0 = unlimited.")] = 0.0,
    burst: Annotated[int, typer.Option(min=0, help="Bucket size; 0 = the rate rounded up.")] = 0,
) -> None:
    """Create a key and print it once: it is stored only as a hash."""
    from ember.cli import client

    body = {"scopes": scope, "name": name, "rate": rate, "burst": burst}
    with _connect() as api:
        new = client.decode(api.fetch("POST", "/api/v1/keys", json=body), render.NewKey)
    render.write_bytes(new.key.encode(), newline=True)
    note = f"key {new.id} ({' '.join(new.scopes)}); store it now, it is not shown again\n"
    render.write_bytes(note.encode(), stderr=True)


@subcommand(keys_app, "ls")
def keys_ls(as_json: JsonFlag = False) -> None:
    """List keys (ids, names, scopes; never the keys themselves)."""
    with _connect() as api:
        raw = api.fetch("GET", "/api/v1/keys")
    _show(raw, as_json, render.KeyList, lambda r: render.keys_table(r.keys, time.time()))


@subcommand(keys_app, "revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (see `ember keys ls`).")],
) -> None:
    """Revoke a key: it stops working at once."""
    from urllib.parse import quote

    with _connect() as api:
        api.fetch("DELETE", f"/api/v1/keys/{quote(key_id, safe='')}")
    render.out().print(f"revoked {key_id}", markup=False)


@subcommand(secrets_app, "set")
def secrets_set(
    name: Annotated[str, typer.Argument(help="Secret name; functions list it under secrets:.")],
    from_file: Annotated[
        Path | None,
        typer.Option("--file", exists=True, dir_okay=False, help="Read the value from a file."),
    ] = None,
    namespace: Namespace = "default",
) -> None:
    """Set a secret from standard input (or --file). Never from the command line: shells keep
    history."""
    from urllib.parse import quote

    value = from_file.read_bytes() if from_file is not None else sys.stdin.buffer.read()
    with _connect() as api:
        api.fetch(
            "PUT",
            f"/api/v1/secrets/{quote(name, safe='')}",
            params={"namespace": namespace},
            content=value,
        )
    render.out().print(f"secret {name} set in {namespace} ({len(value)} bytes)", markup=False)


@subcommand(secrets_app, "ls")
def secrets_ls(as_json: JsonFlag = False, namespace: Namespace = "default") -> None:
    """List the names of a namespace's secrets."""
    with _connect() as api:
        raw = api.fetch("GET", "/api/v1/secrets", params={"namespace": namespace})
    _show(raw, as_json, render.SecretList, lambda r: "\n".join(r.names) or "no secrets")


@subcommand(secrets_app, "rm")
def secrets_rm(name: Annotated[str, typer.Argument()], namespace: Namespace = "default") -> None:
    """Delete a secret no function lists any more."""
    from urllib.parse import quote

    with _connect() as api:
        api.fetch(
            "DELETE", f"/api/v1/secrets/{quote(name, safe='')}", params={"namespace": namespace}
        )
    render.out().print(f"deleted secret {name}", markup=False)


@subcommand(quota_app, "set")
def quota_set(
    namespace: Annotated[str, typer.Argument(help="Namespace.")],
    functions: Annotated[int, typer.Option(min=0, help="Max functions; 0 = unlimited.")] = 0,
    instances: Annotated[int, typer.Option(min=0, help="Max running instances.")] = 0,
    memory: Annotated[int, typer.Option(min=0, help="Max MB of running instances.")] = 0,
) -> None:
    """Set a namespace's quotas (replacing the previous ones)."""
    from urllib.parse import quote

    body = {"functions": functions, "instances": instances, "memory_mb": memory}
    with _connect() as api:
        api.fetch("PUT", f"/api/v1/namespaces/{quote(namespace, safe='')}/quota", json=body)
    render.out().print(
        f"{namespace}: functions {functions or '∞'}, instances {instances or '∞'}, "
        f"memory {memory or '∞'} MB",
        markup=False,
    )


@command
def namespaces(as_json: JsonFlag = False) -> None:
    """List namespaces (tenants) with their sandbox uid and quotas."""
    with _connect() as api:
        raw = api.fetch("GET", "/api/v1/namespaces")
    _show(raw, as_json, render.NamespaceList, lambda r: render.namespaces_table(r.namespaces))


if __name__ == "__main__":
    main()
