"""`ember triggers` and `deploy --allow-trigger-errors`: how the commands build the trigger from
--set, --filter, the delivery options and -f FILE, how triggers are shown, and errors.

No server here: the renderers get sample trigger views, the commands a fake `client.Client` (its
methods, not HTTP), and the requests the real client builds go to an httpx mock transport.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from ember.cli import client, main, render_triggers, triggers
from ember.errors import UserError

NOW = 1_700_000_000.0
SERVER = "http://ember.test:8080"


def _view(**fields: Any) -> dict[str, Any]:
    """A trigger as the server answers it: a NATS one, running for an hour."""
    view: dict[str, Any] = {
        "id": "t0123456789abcdef",
        "function": "default/resize",
        "name": "orders",
        "type": "nats",
        "origin": "api",
        "config": {"url": "nats://127.0.0.1:4222", "subject": "orders.>", "password": "***"},
        "filter": [{"attribute": "type", "exact": "order.created"}],
        "delivery": {"mode": "direct", "concurrency": 4},
        "state": "running",
        "error": "",
        "since": NOW - 3600,
        "delivered": 1200,
        "failed": 3,
        "filtered": 10,
        "queued": 0,
        "lag": 0,
        "oldest_age": 0.0,
        "hook": "",
        "a_future_field": 1,
    }
    return view | fields


FAILING = {
    "name": "sensors",
    "type": "mqtt",
    "state": "failing",
    "error": "cannot reach mqtt://127.0.0.1:1883: connection refused; is the broker running?",
    "since": NOW - 300,
    "delivered": 7,
    "failed": 0,
    "filtered": 0,
    "lag": 42,
    "oldest_age": 125.0,
}
WEBHOOK = {
    "id": "w42",
    "name": "github",
    "type": "webhook",
    "state": "paused",
    "since": NOW - 90,
    "delivered": 2,
    "failed": 0,
    "filtered": 0,
    "oldest_age": 3.25,
    "lag": 1,
    "hook": "/hooks/w42",
}


def _decode(raw: dict[str, Any]) -> render_triggers.TriggerView:
    return client.decode(json.dumps(raw).encode(), render_triggers.TriggerView)


def _text(renderable: object, width: int = 200) -> str:
    """What a person sees, without colour; trailing blanks (table padding) dropped."""
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable, soft_wrap=True)
    assert isinstance(console.file, io.StringIO)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


# Building the trigger from the command line.


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4222", 4222),
        ("-3", -3),
        ("0.5", 0.5),
        ("true", True),
        ("False", False),
        ('"8080"', "8080"),
        ("'007'", "007"),
        ("[a/b, c/#]", ["a/b", "c/#"]),
        ("{x: 1}", {"x": 1}),
        ("10s", "10s"),
        ("*/5 * * * *", "*/5 * * * *"),  # YAML would read an alias and fail
        ("@every 10s", "@every 10s"),  # YAML reserves '@'
        ("orders.>", "orders.>"),
        ("a: b", "a: b"),  # YAML would read a mapping
        ("#secret", "#secret"),  # YAML would read a comment, so null
        ("2024-01-01", "2024-01-01"),  # YAML would read a date
        ("null", "null"),
        ("", ""),
        ("nats://u:p@h:4222", "nats://u:p@h:4222"),
    ],
)
def test_yaml_value(text: str, value: object) -> None:
    assert triggers.yaml_value(text) == value
    assert type(triggers.yaml_value(text)) is type(value)


def test_parse_setting_splits_at_the_first_equals() -> None:
    assert triggers.parse_setting("url=nats://h:4222/?a=b") == ("url", "nats://h:4222/?a=b")
    assert triggers.parse_setting(" qos =1") == ("qos", 1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("url", "--set 'url' is not KEY=VALUE; write e.g. --set url=nats://127.0.0.1:4222"),
        ("=x", "--set '=x' is not KEY=VALUE"),
        ("a b=x", "--set 'a b=x' is not KEY=VALUE"),
        ("type=cron", "--set type=…: type is not a key of the source; give it with --type"),
        ("filter=x", "give it with --filter"),
        ("delivery=x", "give it with --mode, --concurrency, --order-by or --batch-size"),
    ],
)
def test_parse_setting_rejects(text: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        triggers.parse_setting(text)
    assert message in info.value.message
    assert info.value.code == "bad_trigger"


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("type=order.created", {"attribute": "type", "exact": "order.created"}),
        ("subject^=orders.", {"attribute": "subject", "prefix": "orders."}),
        ("source$=/eu", {"attribute": "source", "suffix": "/eu"}),
        ("type=a=b", {"attribute": "type", "exact": "a=b"}),
        ("subject=^x", {"attribute": "subject", "exact": "^x"}),
        ("tenant=", {"attribute": "tenant", "exact": ""}),  # an extension, empty
    ],
)
def test_parse_filter(text: str, entry: dict[str, str]) -> None:
    assert triggers.parse_filter(text) == entry


@pytest.mark.parametrize("text", ["type", "Type=x", "=x", "sub ject=x", "type~=x", "^=x"])
def test_parse_filter_rejects(text: str) -> None:
    with pytest.raises(UserError, match=r"is not ATTR=VALUE, ATTR\^=PREFIX or ATTR\$=SUFFIX"):
        triggers.parse_filter(text)


def test_delivery_holds_only_what_was_given() -> None:
    assert triggers.delivery() == {}
    assert triggers.delivery(concurrency=4) == {"concurrency": 4}
    assert triggers.delivery(
        mode="queue", concurrency=2, order_by="subject", batch_size=50, batch_wait="500ms"
    ) == {
        "mode": "queue",
        "concurrency": 2,
        "order_by": "subject",
        "batch": {"size": 50, "max_wait": "500ms"},
    }
    assert triggers.delivery(batch_size=5, batch_wait="2") == {"batch": {"size": 5, "max_wait": 2}}


def test_build_trigger() -> None:
    built = triggers.build_trigger(
        "nats",
        "orders",
        ["url=nats://127.0.0.1:4222", "subject=orders.>", "queue_group=workers", "max_age=0"],
        ["type=order.created", "subject^=orders.eu."],
        {"concurrency": 4},
    )
    assert built == {
        "type": "nats",
        "name": "orders",
        "url": "nats://127.0.0.1:4222",
        "subject": "orders.>",
        "queue_group": "workers",
        "max_age": 0,
        "filter": [
            {"attribute": "type", "exact": "order.created"},
            {"attribute": "subject", "prefix": "orders.eu."},
        ],
        "delivery": {"concurrency": 4},
    }
    assert triggers.build_trigger("cron", None, ["schedule=@every 10s"], [], {}) == {
        "type": "cron",
        "schedule": "@every 10s",
    }


def test_build_trigger_refuses_a_key_twice() -> None:
    with pytest.raises(UserError, match="--set url is given twice; give it once"):
        triggers.build_trigger("nats", None, ["url=a", "url=b"], [], {})


def test_read_trigger_file(tmp_path: Path) -> None:
    path = tmp_path / "trigger.yaml"
    path.write_text(
        "type: cron\nname: nightly\nschedule: '0 3 * * *'\ntimezone: Europe/Paris\n"
        "filter:\n  - {attribute: type, prefix: io.ember.}\ndelivery: {batch: {size: 10}}\n"
    )
    assert triggers.read_trigger(str(path), io.StringIO("unused")) == {
        "type": "cron",
        "name": "nightly",
        "schedule": "0 3 * * *",
        "timezone": "Europe/Paris",
        "filter": [{"attribute": "type", "prefix": "io.ember."}],
        "delivery": {"batch": {"size": 10}},
    }
    assert triggers.read_trigger("-", io.StringIO("type: webhook\n")) == {"type": "webhook"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- type: cron\n", "must hold one trigger as a mapping (type: …, then its keys)"),
        ("", "must hold one trigger as a mapping"),
        ("type: [cron\n", "is not valid YAML: while parsing a flow sequence"),
    ],
)
def test_read_trigger_file_rejects(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "trigger.yaml"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        triggers.read_trigger(str(path), io.StringIO())
    assert info.value.message.startswith(str(path))
    assert message in info.value.message


def test_read_trigger_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot read trigger file .*nope\.yaml: No such file"):
        triggers.read_trigger(str(tmp_path / "nope.yaml"), io.StringIO())


# The views.


def test_triggers_table() -> None:
    raw = {"triggers": [_view(), _view(**FAILING), _view(**WEBHOOK)]}
    listed = client.decode(json.dumps(raw).encode(), render_triggers.TriggerList).triggers
    lines = _text(render_triggers.triggers_table(listed, NOW, SERVER + "/")).splitlines()
    header = "FUNCTION NAME TYPE STATE SINCE DELIVERED FAILED FILTERED LAG OLDEST"
    rows = [" ".join(line.split()) for line in lines[:4]]
    assert rows == [
        header,
        "default/resize orders nats running 1h ago 1200 3 10 0 -",
        "default/resize sensors mqtt failing 5m ago 7 0 0 42 2m",
        "default/resize github webhook paused 1m ago 2 0 0 1 3.2s",
    ]
    assert lines[4:] == [
        "",
        "default/resize sensors: failing since 5m ago: cannot reach mqtt://127.0.0.1:1883: "
        "connection refused; is the broker running?",
        f"default/resize github: POST events to {SERVER}/hooks/w42",
    ]


def test_triggers_table_without_webhooks_or_errors() -> None:
    lines = _text(render_triggers.triggers_table([_decode(_view())], NOW, SERVER)).splitlines()
    assert len(lines) == 2


def test_failing_trigger_is_red() -> None:
    assert render_triggers.state_text("failing").style == "bold red"
    assert render_triggers.state_text("running").style == "green"
    assert render_triggers.state_text("something new").plain == "something new"
    message = render_triggers.problem(_decode(_view(**FAILING)), NOW)
    assert [span.style for span in message.spans if span.style] == ["bold", "bold red", "red"]
    assert message.plain.startswith("default/resize sensors: failing since 5m ago: cannot reach")


def test_empty_triggers_table() -> None:
    assert _text(render_triggers.triggers_table([], NOW, SERVER)) == "no triggers\n"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.0, "-"), (0.42, "0.4s"), (9.94, "9.9s"), (45.0, "45s"), (125.0, "2m"), (7300.0, "2h")],
)
def test_age(seconds: float, shown: str) -> None:
    assert render_triggers.age(seconds) == shown


def test_summary() -> None:
    added = render_triggers.summary("added", _decode(_view(state="starting")), NOW, SERVER)
    assert _text(added) == "added trigger orders (nats) of default/resize: starting\n"
    failing = render_triggers.summary("added", _decode(_view(**FAILING)), NOW, SERVER)
    assert _text(failing) == (
        "added trigger sensors (mqtt) of default/resize: failing since 5m ago: cannot reach "
        "mqtt://127.0.0.1:1883: connection refused; is the broker running?\n"
    )
    hook = render_triggers.summary("paused", _decode(_view(**WEBHOOK)), NOW, SERVER)
    assert _text(hook) == (
        "paused trigger github (webhook) of default/resize: paused\n"
        f"POST events to {SERVER}/hooks/w42\n"
    )


# The commands, against a fake client.


class FakeApi:
    """Stands in for `client.Client`: records each call, answers JSON like the server."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.listed = [_view(), _view(**FAILING), _view(**WEBHOOK)]

    def __enter__(self) -> FakeApi:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def triggers(self, *args: Any) -> bytes:
        self.calls.append(("triggers", *args))
        return json.dumps({"triggers": self.listed}).encode()

    def add_trigger(self, *args: Any) -> bytes:
        self.calls.append(("add_trigger", *args))
        return json.dumps(_view(state="starting")).encode()

    def remove_trigger(self, *args: Any) -> bytes:
        self.calls.append(("remove_trigger", *args))
        return b'{"deleted": "orders"}'

    def trigger_action(self, *args: Any) -> bytes:
        self.calls.append(("trigger_action", *args))
        return json.dumps(_view(state="paused" if args[-1] == "pause" else "starting")).encode()


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()
    monkeypatch.setattr(main, "_connect", lambda timeout=None: fake)
    monkeypatch.delenv("EMBER_NAMESPACE", raising=False)
    monkeypatch.setenv("EMBER_URL", SERVER)
    return fake


def _run(*args: str, stdin: str | None = None) -> Any:
    return CliRunner().invoke(main.app, list(args), input=stdin)


def _plain(output: str) -> str:
    """A usage error's text without Rich's box and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


NATS = {"type": "nats", "url": "nats://127.0.0.1:4222"}
# fmt: off
MQTT_ARGS = [
    "triggers", "add", "resize", "--type", "mqtt", "--name", "sensors",
    "--set", "url=mqtt://127.0.0.1:1883", "--set", "topic=sensors/+/temp",
    "--set", "qos=1", "--set", "clean=false",
    "--filter", "subject^=sensors/eu", "--filter", "type=io.ember.mqtt.message",
    "--filter", "source$=:1883",
    "--concurrency", "8", "--batch-size", "100", "--batch-wait", "250ms",
    "--order-by", "subject", "--mode", "queue", "--allow-errors", "--ns", "team",
]
# fmt: on


@pytest.mark.parametrize(
    ("args", "call"),
    [
        (["triggers", "ls"], ("triggers", None, None)),
        (["triggers", "ls", "--ns", "team"], ("triggers", None, "team")),
        (["triggers", "ls", "resize"], ("triggers", "resize", "default")),
        (["triggers", "ls", "resize", "--ns", "team"], ("triggers", "resize", "team")),
        (
            ["triggers", "add", "resize", "--type", "nats", "--set", "url=nats://127.0.0.1:4222"],
            ("add_trigger", "resize", "default", NATS, False),
        ),
        (
            MQTT_ARGS,
            (
                "add_trigger",
                "resize",
                "team",
                {
                    "type": "mqtt",
                    "name": "sensors",
                    "url": "mqtt://127.0.0.1:1883",
                    "topic": "sensors/+/temp",
                    "qos": 1,
                    "clean": False,
                    "filter": [
                        {"attribute": "subject", "prefix": "sensors/eu"},
                        {"attribute": "type", "exact": "io.ember.mqtt.message"},
                        {"attribute": "source", "suffix": ":1883"},
                    ],
                    "delivery": {
                        "mode": "queue",
                        "concurrency": 8,
                        "order_by": "subject",
                        "batch": {"size": 100, "max_wait": "250ms"},
                    },
                },
                True,
            ),
        ),
        (["triggers", "rm", "resize", "orders"], ("remove_trigger", "resize", "default", "orders")),
        (
            ["triggers", "pause", "resize", "orders", "--ns", "t"],
            ("trigger_action", "resize", "t", "orders", "pause"),
        ),
        (
            ["triggers", "resume", "resize", "orders"],
            ("trigger_action", "resize", "default", "orders", "resume"),
        ),
    ],
)
def test_commands_call(api: FakeApi, args: list[str], call: tuple[Any, ...]) -> None:
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert api.calls == [call]


def test_namespace_from_the_environment(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_NAMESPACE", "team")
    assert _run("triggers", "ls").exit_code == 0
    assert _run("triggers", "rm", "resize", "orders").exit_code == 0
    assert api.calls == [("triggers", None, "team"), ("remove_trigger", "resize", "team", "orders")]


def test_add_from_a_file(api: FakeApi, tmp_path: Path) -> None:
    path = tmp_path / "trigger.yaml"
    path.write_text("type: cron\nschedule: '*/5 * * * *'\ndelivery: {concurrency: 1}\n")
    result = _run("triggers", "add", "resize", "-f", str(path), "--name", "every5")
    assert result.exit_code == 0, result.output
    trigger = {"type": "cron", "schedule": "*/5 * * * *", "delivery": {"concurrency": 1}}
    assert api.calls == [("add_trigger", "resize", "default", trigger | {"name": "every5"}, False)]


def test_add_from_standard_input(api: FakeApi) -> None:
    result = _run("triggers", "add", "resize", "-f", "-", stdin="type: webhook\nsecret: gh\n")
    assert result.exit_code == 0, result.output
    trigger = {"type": "webhook", "secret": "gh"}
    assert api.calls == [("add_trigger", "resize", "default", trigger, False)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "url=x"], "Invalid value for --type: missing; give the source's type"),
        (
            ["--type", "nats", "--batch-wait", "1s"],
            "Invalid value for --batch-wait: needs --batch-size",
        ),
        (
            ["-f", "t.yaml", "--type", "nats", "--filter", "type=x"],
            "Invalid value for --type, --filter: the file gives the whole trigger; put these in it",
        ),
        (
            ["-f", "t.yaml", "--concurrency", "2"],
            "Invalid value for delivery options (--mode, --concurrency, …): the file gives",
        ),
        (["--type", "nats", "--mode", "fast"], "Invalid value for '--mode': 'fast' is not one of"),
        (["--type", "nats", "--concurrency", "0"], "Invalid value for '--concurrency'"),
    ],
)
def test_add_usage_errors(api: FakeApi, args: list[str], message: str) -> None:
    result = _run("triggers", "add", "resize", *args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Usage: ember triggers add ")
    assert message in _plain(result.output)
    assert api.calls == []


def test_add_input_errors_are_exit_2(api: FakeApi) -> None:
    result = _run("triggers", "add", "resize", "--type", "nats", "--filter", "subject~x")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --filter 'subject~x' is not ATTR=VALUE")
    assert api.calls == []


def test_ls_shows_failing_triggers_with_their_error(api: FakeApi) -> None:
    result = _run("triggers", "ls", "resize")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["FUNCTION", "NAME", "TYPE", "STATE"]
    assert lines[2].split()[:4] == ["default/resize", "sensors", "mqtt", "failing"]
    assert lines[-1] == f"default/resize github: POST events to {SERVER}/hooks/w42"
    assert re.fullmatch(
        r"default/resize sensors: failing since \d+d ago: cannot reach mqtt://127\.0\.0\.1:1883: "
        r"connection refused; is the broker running\?",
        lines[-2],
    )


def test_ls_empty(api: FakeApi) -> None:
    api.listed = []
    assert _run("triggers", "ls", "resize").stdout == "no triggers on resize\n"
    assert _run("triggers", "ls").stdout == "no triggers\n"


def test_ls_json_is_the_servers(api: FakeApi) -> None:
    result = _run("triggers", "ls", "--json")
    assert json.loads(result.stdout) == {"triggers": api.listed}


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["add", "resize", "--type", "nats"],
            "added trigger orders (nats) of default/resize: starting",
        ),
        (["rm", "resize", "orders"], "deleted trigger orders of resize"),
        (["pause", "resize", "orders"], "paused trigger orders (nats) of default/resize: paused"),
        (
            ["resume", "resize", "orders"],
            "resumed trigger orders (nats) of default/resize: starting",
        ),
    ],
)
def test_what_commands_print(api: FakeApi, args: list[str], line: str) -> None:
    result = _run("triggers", *args)
    assert result.exit_code == 0, result.output
    assert result.stdout == line + "\n"


def test_add_json_is_the_servers(api: FakeApi) -> None:
    result = _run("triggers", "add", "resize", "--type", "nats", "--json")
    assert json.loads(result.stdout) == _view(state="starting")


@pytest.mark.parametrize(
    "args",
    [
        ["triggers", "--help"],
        ["triggers", "ls", "--help"],
        ["triggers", "add", "--help"],
        ["triggers", "rm", "--help"],
        ["triggers", "pause", "--help"],
        ["triggers", "resume", "--help"],
    ],
)
def test_help(args: list[str]) -> None:
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


# The real client's requests, against a mock transport.

Handler = Callable[[httpx.Request], httpx.Response]


def _serve(monkeypatch: pytest.MonkeyPatch, handler: Handler) -> list[httpx.Request]:
    """`main._connect` gives a real `client.Client` whose requests go to `handler`; the
    requests it got."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return handler(request)

    def connect(timeout: float | None = None) -> client.Client:
        api = client.Client(SERVER)
        api._http.close()
        api._http = httpx.Client(base_url=SERVER, transport=httpx.MockTransport(record))
        return api

    monkeypatch.setattr(main, "_connect", connect)
    monkeypatch.delenv("EMBER_NAMESPACE", raising=False)
    return seen


@pytest.mark.parametrize(
    ("args", "method", "url"),
    [
        (["ls"], "GET", "/api/v1/triggers"),
        (["ls", "--ns", "team"], "GET", "/api/v1/triggers?namespace=team"),
        (["ls", "resize"], "GET", "/api/v1/functions/resize/triggers?namespace=default"),
        (
            ["rm", "resize", "a/b"],
            "DELETE",
            "/api/v1/functions/resize/triggers/a%2Fb?namespace=default",
        ),
        (
            ["pause", "resize", "orders", "--ns", "t"],
            "POST",
            "/api/v1/functions/resize/triggers/orders/pause?namespace=t",
        ),
        (
            ["resume", "resize", "orders"],
            "POST",
            "/api/v1/functions/resize/triggers/orders/resume?namespace=default",
        ),
    ],
)
def test_requests(monkeypatch: pytest.MonkeyPatch, args: list[str], method: str, url: str) -> None:
    answers = {"GET": {"triggers": []}, "DELETE": {"deleted": "a/b"}, "POST": _view()}
    seen = _serve(monkeypatch, lambda r: httpx.Response(200, json=answers[r.method]))
    result = _run("triggers", *args)
    assert result.exit_code == 0, result.output
    assert [(r.method, str(r.url)) for r in seen] == [(method, SERVER + url)]


def test_add_request_body(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _serve(monkeypatch, lambda r: httpx.Response(201, json=_view()))
    result = _run("triggers", "add", "resize", "--type", "cron", "--set", "schedule=@daily")
    assert result.exit_code == 0, result.output
    (request,) = seen
    assert str(request.url) == f"{SERVER}/api/v1/functions/resize/triggers?namespace=default"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "trigger": {"type": "cron", "schedule": "@daily"},
        "allow_errors": False,
    }


def test_a_bad_trigger_is_exit_2_with_the_servers_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = {
        "error": {
            "code": "bad_trigger",
            "message": "trigger 'sensors': url: cannot reach mqtt://127.0.0.1:1883",
        }
    }
    _serve(monkeypatch, lambda r: httpx.Response(422, json=error))
    result = _run("triggers", "add", "resize", "--type", "mqtt", "--set", "url=x")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == "error: trigger 'sensors': url: cannot reach mqtt://127.0.0.1:1883\n"


@pytest.mark.parametrize(("status", "code"), [(404, 2), (409, 2), (503, 5)])
def test_other_errors_exit_as_elsewhere(
    monkeypatch: pytest.MonkeyPatch, status: int, code: int
) -> None:
    error = {"error": {"code": "x", "message": f"status {status}"}}
    _serve(monkeypatch, lambda r: httpx.Response(status, json=error))
    result = _run("triggers", "rm", "resize", "orders")
    assert result.exit_code == code
    assert result.stderr == f"error: status {status}\n"


def test_deploy_allow_trigger_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text("def handle(req):\n    return 'ok'\n")
    done = {"event": "DeployDone", "status": 200, "result": {"functions": []}}
    answer = json.dumps(done) + "\n"
    seen = _serve(monkeypatch, lambda r: httpx.Response(200, text=answer))
    plain = _run("deploy", str(tmp_path), "--name", "fn", "-q")
    allowed = _run("deploy", str(tmp_path), "--name", "fn", "-q", "--allow-trigger-errors")
    assert plain.exit_code == 0, plain.output
    assert allowed.exit_code == 0, allowed.output
    assert [dict(r.url.params) for r in seen] == [
        {"name": "fn", "namespace": "default"},
        {"name": "fn", "namespace": "default", "allow_trigger_errors": "true"},
    ]
