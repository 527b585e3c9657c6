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
from typer.core import TyperGroup

from ember.cli import render, triggers
from ember.cli.commands import subcommand
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
    queue: Annotated[
        str,
        typer.Option(
            help="Where async invocations wait: empty for SQLite in EMBER_HOME, or a NATS "
            "JetStream server (nats://127.0.0.1:4222)."
        ),
    ] = server_default("queue"),
    async_max_body_mb: Annotated[
        float, typer.Option(help="MB of body an async invocation may have (then 413).")
    ] = server_default("async_max_body_bytes") / (1024 * 1024),
    async_retention: Annotated[
        float,
        typer.Option(help="Seconds an ended async invocation and its Idempotency-Key are kept."),
    ] = server_default("async_retention"),
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
        queue=queue,
        async_max_body_bytes=int(async_max_body_mb * 1024 * 1024),
        async_retention=async_retention,
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
    allow_trigger_errors: Annotated[
        bool,
        typer.Option(
            "--allow-trigger-errors",
            help="Deploy even when a trigger's configuration is wrong or its broker unreachable; "
            "such triggers show as failing in 'ember triggers ls'.",
        ),
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
    if allow_trigger_errors:
        params["allow_trigger_errors"] = "true"
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
        str | None,
        typer.Option(
            "--method",
            "-X",
            help="Default: POST with --data or --async, else GET.",
            show_default=False,
        ),
    ] = None,
    path: Annotated[str, typer.Option(help="Sub-path (and query) after /fn/NAME.")] = "",
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="'Name: value'; repeatable.")
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print status, headers, body and Ember headers as JSON (--async: the accepted "
            "id, status and location; --wait: the ended invocation).",
        ),
    ] = False,
    namespace: Namespace = "default",
    queued: Annotated[
        bool,
        typer.Option(
            "--async", help="Queue the call (/fn-async/NAME) and print its invocation id."
        ),
    ] = False,
    callback_url: Annotated[
        str | None,
        typer.Option(
            help="--async: sent as X-Callback-Url; the result is POSTed there when it ends.",
            show_default=False,
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            help="--async: sent as Idempotency-Key, so a retried submit is not queued twice.",
            show_default=False,
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="--async: wait for the end and print the result body; exit 0 succeeded, "
            "3 failed/dead/expired, 1 cancelled, 4 --timeout.",
        ),
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(min=0, help="--wait: give up after this many seconds.", show_default=False),
    ] = None,
) -> None:
    """Call a function over HTTP and print its response body; with --async, queue the call and
    print its invocation id."""
    from ember.cli import client

    if not queued:
        given = {
            "--callback-url": callback_url,
            "--idempotency-key": idempotency_key,
            "--wait": wait or None,
            "--timeout": timeout,
        }
        if flags := [flag for flag, value in given.items() if value is not None]:
            raise _usage(", ".join(flags), "needs --async")
    elif timeout is not None and not wait:
        raise _usage("--timeout", "needs --wait")
    body = client.parse_data(data, sys.stdin.buffer)
    headers = [client.parse_header(h) for h in header or []]
    if queued:
        verb = client.choose_method(method or "POST", body is not None)
        _invoke_async(
            name,
            verb,
            path,
            namespace,
            body,
            headers,
            callback_url=callback_url,
            idempotency_key=idempotency_key,
            as_json=as_json,
            wait=wait,
            timeout=timeout,
        )
        return
    verb = client.choose_method(method, body is not None)
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


def _invoke_async(
    name: str,
    verb: str,
    path: str,
    namespace: str,
    body: bytes | None,
    headers: list[tuple[str, str]],
    *,
    callback_url: str | None,
    idempotency_key: str | None,
    as_json: bool,
    wait: bool,
    timeout: float | None,
) -> None:
    """`invoke --async`: the id on stdout (and, in a terminal, how to follow it on stderr); with
    --wait, the result body as a plain invoke prints it, and the wait's exit code."""
    from ember.cli import client

    with _connect() as api:
        raw, location = api.invoke_async(
            verb,
            client.function_path(name, path, namespace, queued=True),
            content=body,
            headers=headers,
            callback_url=callback_url,
            idempotency_key=idempotency_key,
        )
        accepted = client.decode(raw, render.Accepted)
        if not wait:
            if as_json:
                render.write_json({**client.decode(raw, dict[str, Any]), "location": location})
                return
            render.write_bytes(accepted.id.encode(), newline=True)
            if render.err().is_terminal:
                render.err().print(
                    f"{accepted.status}; follow it with 'ember invocations get {accepted.id} "
                    "--wait'",
                    style="dim",
                    markup=False,
                )
            return
        raw, inv = _wait(api, accepted.id, timeout)
    code = client.wait_exit_code(inv.status)
    if as_json:
        render.write_bytes(raw, newline=True)
        raise typer.Exit(code)
    result = inv.result
    data = b"" if result is None else render.body_bytes(result.body, result.body_base64)
    if code == 0:
        render.write_bytes(data)
        raise typer.Exit(0)
    if data and client.ember_error(data) is None:
        render.write_bytes(data, stderr=True)
    why = f": {inv.reason}" if inv.reason else ""
    render.print_error(EmberError(f"invocation {inv.id} {inv.status}{why}"))
    raise typer.Exit(code)


def _wait(
    api: "client.Client", invocation_id: str, timeout: float | None
) -> tuple[bytes, render.Invocation]:
    """Poll the invocation until it ends (in a terminal, its status on a line of stderr): the
    server's last answer, raw and decoded."""
    from ember.cli import client

    last = [b""]
    err = render.err()
    with err.status("waiting …") if err.is_terminal else contextlib.nullcontext() as status:

        def poll() -> render.Invocation:
            last[0] = api.invocation(invocation_id)
            inv = client.decode(last[0], render.Invocation)
            if status is not None:
                status.update(render.waiting(inv))
            return inv

        inv = client.wait_for_end(poll, timeout)
    return last[0], inv


def _usage(hint: str, message: str) -> typer.BadParameter:
    """A wrong combination of arguments: 'Usage: …', "Invalid value for HINT: MESSAGE", exit
    code 2. (typer's own class: typer 0.28 carries its own click.)"""
    return typer.BadParameter(message, param_hint=hint)


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


class _DefaultsToLs(TyperGroup):
    """A group whose first argument, when it names no subcommand, is `ls`'s: `ember invocations
    NAME` is `ember invocations ls NAME`. (A function named like a subcommand: `ls NAME`, or
    `--function NAME`.)"""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's or click's Context
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["ls", *args]
        return super().parse_args(ctx, args)


keys_app = typer.Typer(help="API keys: create (shown once), list, revoke. Needs an admin key.")
secrets_app = typer.Typer(help="Secrets of a namespace, encrypted at rest; values are write-only.")
quota_app = typer.Typer(help="Quotas of a namespace (admin).")
app.add_typer(keys_app, name="keys")
app.add_typer(secrets_app, name="secrets")
app.add_typer(quota_app, name="quota")
invocations_app = typer.Typer(
    cls=_DefaultsToLs,
    no_args_is_help=True,
    help="Async invocations (invoke --async): 'ember invocations NAME' lists a function's (short "
    "for 'ls NAME'; a function named get, ls or cancel: --function NAME); get ID shows one.",
)
dlq_app = typer.Typer(
    no_args_is_help=True,
    help="Dead-letter queue: a function's async invocations that ran out of retries.",
)
app.add_typer(invocations_app, name="invocations")
app.add_typer(dlq_app, name="dlq")
app.add_typer(triggers.app, name="triggers")


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


# Async invocations and the dead-letter queue.

InvocationId = Annotated[
    str,
    typer.Argument(
        metavar="ID",
        help="Invocation id (what invoke --async printed; --json listings have it whole).",
        show_default=False,
    ),
]
Limit = Annotated[int, typer.Option(min=1, help="Most recent invocations to show.")]
Timeout = Annotated[
    float | None,
    typer.Option(
        min=0, help="--wait: give up after this many seconds (exit 4).", show_default=False
    ),
]


@subcommand(invocations_app, "ls")
def invocations_ls(
    name: Annotated[
        str | None, typer.Argument(metavar="NAME", help="Function name.", show_default=False)
    ] = None,
    function: Annotated[
        str | None,
        typer.Option("--function", help="Function name, e.g. one named 'get'.", show_default=False),
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            help="Only these: queued, running, succeeded, failed, dead, expired or cancelled.",
            show_default=False,
        ),
    ] = None,
    limit: Limit = 20,
    as_json: JsonFlag = False,
    namespace: Namespace = "default",
) -> None:
    """List a function's async invocations, newest first (the default of 'ember invocations')."""
    if name is None and function is None:
        raise _usage("NAME", "missing; give a function's name, or --function NAME")
    if name is not None and function is not None:
        raise _usage("NAME / --function", "give the function's name once, not both")
    with _connect() as api:
        raw = api.invocations(name or function or "", namespace, status, limit)
    _show(
        raw,
        as_json,
        render.InvocationList,
        lambda r: render.invocations_table(r.invocations, time.time()),
    )


@subcommand(invocations_app, "get")
def invocations_get(
    invocation_id: InvocationId,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Poll until it ends; exit 0 succeeded, 3 failed/dead/expired, 1 cancelled.",
        ),
    ] = False,
    timeout: Timeout = None,
    as_json: JsonFlag = False,
) -> None:
    """Show one async invocation: status, why it ended, when, each attempt, the result."""
    from ember.cli import client

    if timeout is not None and not wait:
        raise _usage("--timeout", "needs --wait")
    with _connect() as api:
        raw, ended = (
            _wait(api, invocation_id, timeout) if wait else (api.invocation(invocation_id), None)
        )
    _show(raw, as_json, render.Invocation, lambda i: render.invocation_detail(i, time.time()))
    if ended is not None:
        raise typer.Exit(client.wait_exit_code(ended.status))


@subcommand(invocations_app, "cancel")
def invocations_cancel(invocation_id: InvocationId, as_json: JsonFlag = False) -> None:
    """Cancel a queued invocation (one running or ended cannot be: exit 2)."""
    from ember.cli import client

    with _connect() as api:
        raw = api.cancel_invocation(invocation_id)
    if as_json:
        render.write_bytes(raw, newline=True)
        return
    inv = client.decode(raw, render.Invocation)
    render.out().print(f"cancelled {inv.id}", markup=False)


@subcommand(dlq_app, "ls")
def dlq_ls(
    name: Name, limit: Limit = 20, as_json: JsonFlag = False, namespace: Namespace = "default"
) -> None:
    """List a function's dead invocations (retries exhausted), newest first."""
    with _connect() as api:
        raw = api.dead_letters(name, namespace, limit)
    _show(
        raw,
        as_json,
        render.InvocationList,
        lambda r: render.invocations_table(
            r.invocations, time.time(), empty=f"no dead invocations of {name}"
        ),
    )


@subcommand(dlq_app, "show")
def dlq_show(invocation_id: InvocationId, as_json: JsonFlag = False) -> None:
    """Show a dead invocation as 'invocations get' does, with the request that was sent."""
    with _connect() as api:
        raw = api.invocation(invocation_id)
    _show(
        raw,
        as_json,
        render.Invocation,
        lambda i: render.invocation_detail(i, time.time(), request=True),
    )


@subcommand(dlq_app, "replay")
def dlq_replay(
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="ID|NAME",
            help="A dead invocation's id; with --all, the function's name.",
            show_default=False,
        ),
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Queue every dead invocation of function NAME again.")
    ] = False,
    as_json: JsonFlag = False,
    namespace: Namespace = "default",
) -> None:
    """Queue dead invocations again, from a first attempt: one by id, or --all of a function."""
    from ember.cli import client

    if target is None:
        raise _usage(
            "ID|NAME", "missing; give a dead invocation's ID, or --all and a function NAME"
        )
    with _connect() as api:
        raw = api.replay_dead_letters(target, namespace) if every else api.replay_invocation(target)
    if as_json:
        render.write_bytes(raw, newline=True)
        return
    if not every:
        inv = client.decode(raw, render.Invocation)
        render.out().print(f"replayed {inv.id} ({inv.status})", markup=False)
        return
    replayed = client.decode(raw, render.Replayed).replayed
    lines = [f"replayed {len(replayed)} dead invocation(s) of {target}", *replayed]
    render.out().print("\n".join(lines), markup=False)


def _interactive() -> bool:
    """Someone can answer a question: standard input is a terminal."""
    return sys.stdin.isatty()


@subcommand(dlq_app, "purge")
def dlq_purge(
    name: Name,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    as_json: JsonFlag = False,
    namespace: Namespace = "default",
) -> None:
    """Delete every dead invocation of a function for good; in a terminal it asks first."""
    from ember.cli import client

    if not yes and not as_json and _interactive():
        typer.confirm(
            f"Delete every dead invocation of {name} (namespace {namespace})? They cannot be "
            "replayed after",
            abort=True,
        )
    with _connect() as api:
        raw = api.purge_dead_letters(name, namespace)
    if as_json:
        render.write_bytes(raw, newline=True)
        return
    purged = client.decode(raw, render.Purged).purged
    render.out().print(f"purged {purged} dead invocation(s) of {name}", markup=False)


@command
def namespaces(as_json: JsonFlag = False) -> None:
    """List namespaces (tenants) with their sandbox uid and quotas."""
    with _connect() as api:
        raw = api.fetch("GET", "/api/v1/namespaces")
    _show(raw, as_json, render.NamespaceList, lambda r: render.namespaces_table(r.namespaces))


if __name__ == "__main__":
    main()
