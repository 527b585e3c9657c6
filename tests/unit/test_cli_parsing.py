"""The CLI's pure helpers: input parsing, error mapping, rendering; and `--help` of every command.

No server here: commands that talk HTTP are exercised by the integration tests.
"""

from __future__ import annotations

import base64
import io
import json
from datetime import datetime
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ember.cli import client, render
from ember.cli.main import app, ember_home, server_default, server_url
from ember.errors import (
    CapacityError,
    EmberError,
    FunctionError,
    PlatformError,
    UserError,
)

COMMANDS = ["up", "deploy", "invoke", "ls", "describe", "rm", "logs", "activations", "scale"]
COMMANDS += ["doctor"]
NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("1h30m", 5400.0),
        (" 5m ", 300.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert client.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "m", "10x", "10m x", "-5s", "5 s", "1h-30m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UserError, match="is not valid"):
        client.parse_duration(text)


def test_parse_since_duration_is_relative_to_now() -> None:
    assert client.parse_since("10m", NOW) == NOW - 600


def test_parse_since_large_number_is_a_timestamp() -> None:
    assert client.parse_since("1700000123.5", NOW) == 1700000123.5


@pytest.mark.parametrize("text", ["10", "0", "nan", "inf", "yesterday"])
def test_parse_since_rejects(text: str) -> None:
    with pytest.raises(UserError):
        client.parse_since(text, NOW)


def test_log_params() -> None:
    params = client.log_params("30s", True, 50, NOW)
    assert params == {"follow": "true", "since": repr(NOW - 30), "limit": "50"}
    assert client.log_params(None, False, None, NOW) == {"follow": "false"}


def test_parse_data_literal_and_absent() -> None:
    stdin = io.BytesIO(b"unused")
    assert client.parse_data(None, stdin) is None
    assert client.parse_data("héllo", stdin) == "héllo".encode()
    assert client.parse_data("", stdin) == b""


def test_parse_data_reads_files_byte_for_byte(tmp_path: Path) -> None:
    blob = bytes(range(256))
    (tmp_path / "body.bin").write_bytes(blob)
    assert client.parse_data(f"@{tmp_path / 'body.bin'}", io.BytesIO()) == blob


def test_parse_data_reads_stdin() -> None:
    assert client.parse_data("@-", io.BytesIO(b"\x00\xffraw")) == b"\x00\xffraw"


def test_parse_data_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read --data file") as info:
        client.parse_data(f"@{tmp_path / 'nope'}", io.BytesIO())
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("text", "header"),
    [
        ("Content-Type: application/json", ("Content-Type", "application/json")),
        ("X-A:b", ("X-A", "b")),
        ("X-Time: 12:30:00", ("X-Time", "12:30:00")),
        ("X-Empty:", ("X-Empty", "")),
    ],
)
def test_parse_header(text: str, header: tuple[str, str]) -> None:
    assert client.parse_header(text) == header


@pytest.mark.parametrize("text", ["no colon", ": value", "Bad Name: x"])
def test_parse_header_rejects(text: str) -> None:
    with pytest.raises(UserError, match="Name: value"):
        client.parse_header(text)


def test_choose_method() -> None:
    assert client.choose_method(None, has_body=False) == "GET"
    assert client.choose_method(None, has_body=True) == "POST"
    assert client.choose_method("put", has_body=True) == "PUT"
    with pytest.raises(UserError):
        client.choose_method("GET /", has_body=False)


def test_function_and_api_paths() -> None:
    assert client.function_path("hello") == "/fn/hello"
    assert client.function_path("hello", "/a/b") == "/fn/hello/a/b"
    assert client.function_path("hello", "a") == "/fn/hello/a"
    assert client.function_path("hello", "?x=1") == "/fn/hello?x=1"
    assert client.api_path("hello", "logs") == "/api/v1/functions/hello/logs"
    assert client.api_path("a/b") == "/api/v1/functions/a%2Fb"


@pytest.mark.parametrize(
    ("dirname", "name"),
    [("hello", "hello"), ("My_Func", "my-func"), ("two words", "two-words")],
)
def test_default_name(tmp_path: Path, dirname: str, name: str) -> None:
    (tmp_path / dirname).mkdir()
    assert client.default_name(tmp_path / dirname) == name


def test_default_name_of_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "Image_Resize").mkdir()
    monkeypatch.chdir(tmp_path / "Image_Resize")
    assert client.default_name(Path()) == "image-resize"


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EMBER_URL", raising=False)
    monkeypatch.delenv("EMBER_HOME", raising=False)
    assert server_url() == "http://127.0.0.1:8080"
    assert ember_home() == Path("~/.ember").expanduser()
    monkeypatch.setenv("EMBER_URL", "http://10.0.0.1:9000")
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    assert server_url() == "http://10.0.0.1:9000"
    assert ember_home() == tmp_path


def test_up_defaults_come_from_server_config() -> None:
    assert server_default("port") == 8080
    assert server_default("grace_period") == 30.0


@pytest.mark.parametrize(
    ("status", "cls", "exit_code"),
    [
        (400, UserError, 2),
        (404, UserError, 2),
        (413, UserError, 2),
        (422, FunctionError, 3),
        (502, FunctionError, 3),
        (504, FunctionError, 3),
        (429, CapacityError, 4),
        (500, PlatformError, 5),
        (503, PlatformError, 5),
    ],
)
def test_error_class_and_exit_code(status: int, cls: type[EmberError], exit_code: int) -> None:
    assert client.error_class(status) is cls
    assert client.error_from_response(status, b"").exit_code == exit_code


def test_error_from_ember_envelope() -> None:
    body = b'{"error": {"code": "deploy_rejected", "message": "import failed", "detail": "Tb"}}'
    exc = client.error_from_response(422, body)
    assert isinstance(exc, FunctionError)
    assert (exc.code, exc.message, exc.detail, exc.status) == (
        "deploy_rejected",
        "import failed",
        "Tb",
        422,
    )


def test_error_from_other_bodies() -> None:
    assert client.error_from_response(500, b"").message == "server answered HTTP 500"
    assert client.error_from_response(404, b"Not Found\n").message == (
        "server answered HTTP 404: Not Found"
    )
    assert client.error_from_response(400, b'{"error": "flat"}').message.endswith('"flat"}')


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (200, b"ok", 0),
        (204, b"", 0),
        (404, b"user said no", 2),
        (500, b"user code failed", 3),
        (504, b'{"error": {"code": "timeout", "message": "timed out"}}', 3),
        (429, b'{"error": {"code": "capacity", "message": "queue full"}}', 4),
        (503, b'{"error": {"code": "platform", "message": "zygote died"}}', 5),
    ],
)
def test_invoke_exit_code(status: int, body: bytes, code: int) -> None:
    assert client.invoke_exit_code(status, body) == code


def test_decode_rejects_unexpected_answers() -> None:
    with pytest.raises(PlatformError, match="unexpected answer"):
        client.decode(b'{"functions": 3}', render.FunctionList)


def _text(renderable: object, width: int = 200) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable, soft_wrap=True)
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def test_error_rendering_includes_detail() -> None:
    body = b'{"error": {"code": "deploy_rejected", "message": "import failed", "detail": "Tb\\n"}}'
    text = _text(render.error_text(client.error_from_response(422, body)))
    assert text == "error: import failed\nTb\n"
    assert _text(render.error_text(UserError("bad [name]"))) == "error: bad [name]\n"


def test_unreachable_message_names_the_url() -> None:
    assert client.UNREACHABLE.format(url="http://x:1") == (
        "no Ember server at http://x:1; start one with 'ember up' or set EMBER_URL"
    )


def test_log_line() -> None:
    entry = render.LogEntry(
        ts=NOW + 0.042, message="hi [there]\n", stream="stderr", request_id="abcdef0123456789"
    )
    clock = datetime.fromtimestamp(NOW).strftime("%H:%M:%S")
    assert _text(render.log_line(entry)) == f"{clock}.042 abcdef01 stderr hi [there]\n"


def test_ago() -> None:
    assert render.ago(NOW - 5, NOW) == "5s ago"
    assert render.ago(NOW - 125, NOW) == "2m ago"
    assert render.ago(NOW - 7200, NOW) == "2h ago"
    assert render.ago(NOW - 3 * 86400, NOW) == "3d ago"
    assert render.ago(NOW + 10, NOW) == "0s ago"


def test_millis() -> None:
    assert [render.millis(v) for v in (0.4242, 87.4, 30000)] == ["0.42 ms", "87 ms", "30.0 s"]


def test_invocation_summary_text_and_binary() -> None:
    headers = {"X-Ember-Request-Id": "r1", "X-Ember-Revision": "3", "X-Ember-Start": "warm"}
    summary = render.invocation_summary(200, headers, b"hello")
    assert summary == {
        "status": 200,
        "headers": headers,
        "body": "hello",
        "body_base64": False,
        "request_id": "r1",
        "revision": 3,
        "start": "warm",
    }
    binary = render.invocation_summary(502, {}, b"\xff\x00")
    assert binary["body"] == base64.b64encode(b"\xff\x00").decode()
    assert binary["body_base64"] is True
    assert binary["revision"] is None


def test_deployed_lines() -> None:
    created = render.Deployed(name="hello", revision=3, created=True, url="http://h/fn/hello")
    same = render.Deployed(name="hello", revision=3, created=False)
    assert _text(render.deployed(created)) == "deployed hello revision 3 → http://h/fn/hello\n"
    assert _text(render.deployed(same)) == "hello unchanged (revision 3)\n"


def test_functions_table() -> None:
    raw = (
        b'{"functions": [{"name": "hello", "revision": 2, "sha256": "ab", "created_at": 1.0,'
        b' "updated_at": 1699999940.0, "spec": {"handler": "handler.handle", "source": ".",'
        b' "memory": 128, "timeout": 30.0, "concurrency": 1,'
        b' "scale": {"min": 0, "max": 10, "idle": 60.0}, "env": {}},'
        b' "instances": {"idle": 1, "busy": 2, "starting": 0}, "zygote": true,'
        b' "url": "http://h/fn/hello", "future_field": 1}]}'
    )
    text = _text(render.functions_table(client.decode(raw, render.FunctionList).functions, NOW))
    assert "INSTANCES(idle/busy)" in text
    row = text.splitlines()[1].split()
    assert row == ["default", "hello", "2", "128", "MB", "30s", "1", "0-10", "1/2", "1m", "ago"]


def test_empty_tables_say_so() -> None:
    assert "no functions deployed" in _text(render.functions_table([], NOW))
    assert "no activations" in _text(render.activations_table([]))


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_doctor_json_without_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ember.pool.capabilities")
    monkeypatch.setenv("EMBER_URL", "http://127.0.0.1:1")  # nothing listens on port 1
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["server"]["reachable"] is False
    assert "no Ember server at http://127.0.0.1:1" in report["server"]["detail"]
    assert all(set(check) == {"name", "ok", "detail"} for check in report["checks"])
