"""The CLI's async side: the invocation views, the --wait loop, and how the commands parse.

No server here: the renderers get sample InvocationInfo JSON, the wait loop a fake poll, and the
commands a fake `client.Client` (its methods, not HTTP). The integration tests run them against
a real server.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import msgspec
import pytest
from rich.console import Console
from typer.testing import CliRunner

from ember.cli import client, main, render
from ember.errors import UserError

NOW = 1_700_000_000.0
ID = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


def _info(**fields: Any) -> dict[str, Any]:
    """An InvocationInfo as the server answers it: a dead one after three attempts."""
    info: dict[str, Any] = {
        "id": ID,
        "function": "resize",
        "namespace": "default",
        "status": "dead",
        "accepted": NOW - 300,
        "not_before": NOW - 200,
        "ended": NOW - 60,
        "reason": "5xx after 3 attempts",
        "callback": "https://example.com/hook",
        "idempotency_key": "order-42",
        "attempts": [
            _attempt(1, NOW - 290, 87.4, 503, "5xx", "function_error"),
            _attempt(2, NOW - 250, 0.42, 504, "timeout", "timeout"),
            _attempt(3, NOW - 200, 1500.0, 503, "5xx", ""),
        ],
        "request": {
            "method": "POST",
            "path": "/thumb",
            "query": "w=100",
            "headers": [["content-type", "text/plain"], ["x-trace", "t1"]],
            "body": base64.b64encode(b"hello [bold]body[/]").decode(),
            "body_base64": True,
        },
        "result": {
            "status": 503,
            "headers": [["content-type", "text/plain"]],
            "body": "upstream down\n",
            "body_base64": False,
        },
        "a_future_field": 1,
    }
    return info | fields


def _attempt(
    number: int, started: float, ms: float, status: int, outcome: str, error: str
) -> dict[str, Any]:
    request_id = f"req{number}abcdefghijkl"
    return {
        "number": number,
        "request_id": request_id,
        "started": started,
        "duration_ms": ms,
        "status": status,
        "outcome": outcome,
        "error": error,
    }


def _decode(info: dict[str, Any]) -> render.Invocation:
    return client.decode(json.dumps(info).encode(), render.Invocation)


def _text(renderable: object, width: int = 200) -> str:
    """What a person sees, without colour; trailing blanks (table padding) dropped."""
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable, soft_wrap=True)
    assert isinstance(console.file, io.StringIO)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


def _clock(ts: float) -> str:
    moment = datetime.fromtimestamp(ts)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# The views.


def test_invocations_table() -> None:
    running = _info(id=OTHER, status="running", reason="", ended=0, result=None, attempts=[])
    raw = json.dumps({"invocations": [_info(), running]}).encode()
    listed = client.decode(raw, render.InvocationList).invocations
    lines = _text(render.invocations_table(listed, NOW)).splitlines()
    assert lines[0].split() == [
        "ID",
        "STATUS",
        "ATTEMPTS",
        "ACCEPTED",
        "DURATION",
        "RESULT",
        "REASON",
    ]
    row = ["01234567", "dead", "3", "5m", "ago", "1.5", "s", "503", "5xx", "after", "3", "attempts"]
    assert lines[1].split() == row
    assert lines[2].split() == ["fedcba98", "running", "0", "5m", "ago", "-", "-"]
    assert len(lines) == 3


def test_invocations_table_colours_statuses() -> None:
    styles = {status: render.status_text(status).style for status in client.ENDED}
    assert styles == {
        "succeeded": "green",
        "failed": "red",
        "dead": "bold red",
        "expired": "magenta",
        "cancelled": "dim",
    }
    assert render.status_text("queued").style == "cyan"
    assert render.status_text("running").style == "yellow"
    assert render.status_text("something new").plain == "something new"


def test_empty_invocation_tables_say_so() -> None:
    assert _text(render.invocations_table([], NOW)) == "no async invocations\n"
    empty = render.invocations_table([], NOW, empty="no dead invocations of resize")
    assert _text(empty) == "no dead invocations of resize\n"


def test_attempt_lines() -> None:
    attempts = _decode(_info()).attempts
    lines = [_text(render.attempt_line(a)) for a in attempts]
    assert lines == [
        f"#1  {_clock(NOW - 290)}  5xx          503     87 ms  request req1abcd  function_error\n",
        f"#2  {_clock(NOW - 250)}  timeout      504   0.42 ms  request req2abcd  timeout\n",
        f"#3  {_clock(NOW - 200)}  5xx          503     1.5 s  request req3abcd\n",
    ]


def test_attempt_line_without_a_request_id() -> None:
    attempt = render.InvocationAttempt(number=1, started=NOW, outcome="crash", status=502)
    assert _text(render.attempt_line(attempt)).endswith("crash        502   0.00 ms  request -\n")


def test_invocation_detail() -> None:
    text = _text(render.invocation_detail(_decode(_info()), NOW))
    assert text == (
        f"invocation {ID}\n"
        "function         resize (namespace default)\n"
        "status           dead\n"
        "reason           5xx after 3 attempts\n"
        f"accepted         {_stamp(NOW - 300)} (5m ago)\n"
        f"ended            {_stamp(NOW - 60)} (1m ago)\n"
        "callback         https://example.com/hook\n"
        "idempotency key  order-42\n"
        "\n"
        "attempts (3)\n"
        f"#1  {_clock(NOW - 290)}  5xx          503     87 ms  request req1abcd  function_error\n"
        f"#2  {_clock(NOW - 250)}  timeout      504   0.42 ms  request req2abcd  timeout\n"
        f"#3  {_clock(NOW - 200)}  5xx          503     1.5 s  request req3abcd\n"
        "\n"
        "result  HTTP 503\n"
        "upstream down\n"
    )


def test_invocation_detail_with_the_request_decodes_base64_bodies() -> None:
    result = {"status": 200, "headers": [], "body": base64.b64encode(b"ok!").decode()}
    inv = _decode(_info(result=result | {"body_base64": True}))
    text = _text(render.invocation_detail(inv, NOW, request=True))
    assert text.endswith(
        "request  POST /thumb?w=100\n"
        "content-type: text/plain\n"
        "x-trace: t1\n"
        "hello [bold]body[/]\n"  # text, never markup
        "\n"
        "result  HTTP 200\n"
        "ok!\n"
    )
    assert "request  POST" not in _text(render.invocation_detail(inv, NOW))


def test_invocation_detail_while_queued_for_a_retry() -> None:
    inv = _decode(
        _info(status="queued", not_before=NOW + 30, ended=0, reason=None, callback=None)
        | {"result": None, "idempotency_key": ""}
    )
    lines = _text(render.invocation_detail(inv, NOW)).splitlines()
    assert lines[1:5] == [
        "function      resize (namespace default)",
        "status        queued",
        f"accepted      {_stamp(NOW - 300)} (5m ago)",
        f"next attempt  {_stamp(NOW + 30)} (in 30s)",
    ]
    assert lines[-1] == "result  none"


def test_invocation_detail_without_attempts() -> None:
    inv = render.Invocation(id=ID, status="queued", function="resize", accepted=NOW)
    assert "no attempts yet\n\nresult  none\n" in _text(render.invocation_detail(inv, NOW))


def test_bodies() -> None:
    assert render.body_bytes(base64.b64encode(b"\x00\xff").decode(), True) == b"\x00\xff"
    assert render.body_bytes("héllo", False) == "héllo".encode()
    assert _text(render.body_text(b"")) == "(empty body)\n"
    assert _text(render.body_text(b"\x00\xff\xfe")) == (
        "(3 bytes of binary data; --json shows them base64)\n"
    )
    long = _text(render.body_text(b"x" * (render.BODY_SHOWN + 10)))
    assert long == "x" * render.BODY_SHOWN + "\n… 10 more characters; --json shows all\n"


def test_until() -> None:
    assert render.until(NOW + 90, NOW) == "in 1m"
    assert render.until(NOW - 5, NOW) == "now"


def test_waiting_line() -> None:
    assert render.waiting(_decode(_info(status="running"))) == (
        "waiting for 01234567: running, 3 attempt(s) …"
    )


# The wait loop.


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds

    def time(self) -> float:
        return self.now


def _poller(statuses: list[str]) -> Iterator[render.Invocation]:
    for status in statuses:
        yield render.Invocation(id=ID, status=status)


def _wait(statuses: list[str], timeout: float | None, clock: FakeClock) -> render.Invocation:
    answers = _poller(statuses)
    return client.wait_for_end(lambda: next(answers), timeout, sleep=clock.sleep, clock=clock.time)


@pytest.mark.parametrize(
    ("status", "code"),
    [("succeeded", 0), ("failed", 3), ("dead", 3), ("expired", 3), ("cancelled", 1)],
)
def test_wait_returns_the_ended_invocation_and_its_exit_code(status: str, code: int) -> None:
    clock = FakeClock()
    ended = _wait(["queued", "running", status], None, clock)
    assert ended.status == status
    assert client.wait_exit_code(ended.status) == code
    assert clock.sleeps == [0.02, 0.04]


def test_wait_backs_off_to_one_second() -> None:
    clock = FakeClock()
    _wait(["running"] * 10 + ["succeeded"], None, clock)
    assert clock.sleeps == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0, 1.0, 1.0])


def test_wait_does_not_sleep_when_already_ended() -> None:
    clock = FakeClock()
    assert _wait(["succeeded"], 0.0, clock).status == "succeeded"
    assert clock.sleeps == []


def test_wait_times_out_with_exit_code_4() -> None:
    clock = FakeClock()
    with pytest.raises(client.WaitTimeout) as info:
        _wait(["queued"] * 3 + ["running"] * 100, 0.5, clock)
    assert info.value.exit_code == 4
    assert info.value.message == (
        f"invocation {ID} is still running after 0.5s; "
        f"'ember invocations get {ID} --wait' waits again"
    )
    # never sleeps past the deadline, and polls once more at it
    assert clock.sleeps == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.2])
    assert clock.now == pytest.approx(100.5)


def test_wait_with_a_zero_timeout_polls_once() -> None:
    clock = FakeClock()
    with pytest.raises(client.WaitTimeout, match="still queued after 0s"):
        _wait(["queued", "succeeded"], 0.0, clock)
    assert clock.sleeps == []


def test_wait_returns_what_ends_at_the_deadline() -> None:
    clock = FakeClock()
    assert _wait(["running"] * 5 + ["failed"], 0.5, clock).status == "failed"


# Paths and errors.


def test_async_paths() -> None:
    assert client.function_path("hello", queued=True) == "/fn-async/hello"
    assert client.function_path("hello", "a?x=1", "team", queued=True) == (
        "/fn-async/team/hello/a?x=1"
    )
    assert client.invocation_path(ID) == f"/api/v1/invocations/{ID}"
    assert client.invocation_path("a/b", "replay") == "/api/v1/invocations/a%2Fb/replay"


def test_not_found_hint_for_short_ids() -> None:
    short = client.not_found_hint(UserError("no invocation 01234567", status=404), "01234567")
    assert "'01234567' is shorter than an invocation id" in short.message
    whole = client.not_found_hint(UserError(f"no invocation {ID}", status=404), ID)
    assert whole.message == f"no invocation {ID}"


# The commands, against a fake client.


class FakeApi:
    """Stands in for `client.Client`: records each call, answers JSON like the server."""

    def __init__(self, invocations: list[dict[str, Any]] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answers = iter(invocations or [_info()])
        self.last = _info()

    def __enter__(self) -> FakeApi:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def invoke_async(self, method: str, path: str, **kwargs: Any) -> tuple[bytes, str]:
        self.calls.append(("invoke_async", method, path, kwargs))
        body = {"id": ID, "status": "queued"}
        return msgspec.json.encode(body), f"/api/v1/invocations/{ID}"

    def invocation(self, invocation_id: str) -> bytes:
        self.calls.append(("invocation", invocation_id))
        self.last = next(self.answers, self.last)
        return json.dumps(self.last).encode()

    def cancel_invocation(self, invocation_id: str) -> bytes:
        self.calls.append(("cancel_invocation", invocation_id))
        return json.dumps(_info(status="cancelled")).encode()

    def replay_invocation(self, invocation_id: str) -> bytes:
        self.calls.append(("replay_invocation", invocation_id))
        return json.dumps(_info(status="queued", result=None)).encode()

    def invocations(self, *args: Any) -> bytes:
        self.calls.append(("invocations", *args))
        return json.dumps({"invocations": [_info()]}).encode()

    def dead_letters(self, *args: Any) -> bytes:
        self.calls.append(("dead_letters", *args))
        return b'{"invocations": []}'

    def replay_dead_letters(self, *args: Any) -> bytes:
        self.calls.append(("replay_dead_letters", *args))
        return json.dumps({"replayed": [ID, OTHER]}).encode()

    def purge_dead_letters(self, *args: Any) -> bytes:
        self.calls.append(("purge_dead_letters", *args))
        return b'{"purged": 7}'


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()
    monkeypatch.setattr(main, "_connect", lambda timeout=None: fake)
    monkeypatch.delenv("EMBER_NAMESPACE", raising=False)
    return fake


def _run(*args: str) -> Any:
    return CliRunner().invoke(main.app, list(args))


def _plain(output: str) -> str:
    """A usage error's text without Rich's box and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


@pytest.mark.parametrize(
    ("args", "call"),
    [
        (["invocations", "resize"], ("invocations", "resize", "default", None, 20)),
        (["invocations", "ls", "resize"], ("invocations", "resize", "default", None, 20)),
        (
            ["invocations", "--status", "dead", "--limit", "5", "--ns", "team", "resize"],
            ("invocations", "resize", "team", "dead", 5),
        ),
        (["invocations", "--function", "get"], ("invocations", "get", "default", None, 20)),
        (["invocations", "ls", "get"], ("invocations", "get", "default", None, 20)),
        (["invocations", "get", ID], ("invocation", ID)),
        (["invocations", "cancel", ID], ("cancel_invocation", ID)),
        (["dlq", "ls", "resize", "--limit", "3"], ("dead_letters", "resize", "default", 3)),
        (["dlq", "show", ID], ("invocation", ID)),
        (["dlq", "replay", ID], ("replay_invocation", ID)),
        (["dlq", "replay", "--all", "resize"], ("replay_dead_letters", "resize", "default")),
        (["dlq", "replay", "resize", "--all", "--ns", "t"], ("replay_dead_letters", "resize", "t")),
        (["dlq", "purge", "resize", "--yes"], ("purge_dead_letters", "resize", "default")),
    ],
)
def test_commands_call(api: FakeApi, args: list[str], call: tuple[Any, ...]) -> None:
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert api.calls == [call]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["invocations", "--status", "dead"], "Invalid value for NAME: missing"),
        (["invocations", "resize", "--function", "x"], "give the function's name once"),
        (["invocations", "get"], "Missing argument 'ID'"),
        (["invocations", "get", ID, "--timeout", "5"], "Invalid value for --timeout: needs --wait"),
        (["dlq", "replay"], "missing; give a dead invocation's ID, or --all and a function NAME"),
        (["dlq", "replay", "--all"], "missing; give a dead invocation's ID, or --all"),
        (["invoke", "resize", "--wait"], "Invalid value for --wait: needs --async"),
        (
            ["invoke", "resize", "--callback-url", "http://x", "--idempotency-key", "k"],
            "Invalid value for --callback-url, --idempotency-key: needs --async",
        ),
        (["invoke", "resize", "--async", "--timeout", "1"], "for --timeout: needs --wait"),
    ],
)
def test_bad_combinations_are_usage_errors(api: FakeApi, args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Usage: ember ")
    assert message in _plain(result.output)
    assert api.calls == []


@pytest.mark.parametrize(
    "args",
    [
        ["invocations"],
        ["invocations", "--help"],
        ["invocations", "get", "--help"],
        ["invocations", "ls", "--help"],
        ["dlq", "--help"],
        ["dlq", "replay", "--help"],
        ["dlq", "purge", "--help"],
    ],
)
def test_help(args: list[str]) -> None:
    result = _run(*args)
    assert result.exit_code == (2 if args == ["invocations"] else 0), result.output
    assert "Usage" in result.output


def test_invoke_async_prints_only_the_id(api: FakeApi) -> None:
    result = _run(
        "invoke", "resize", "--async", "-d", "x", "--path", "/thumb",
        "--callback-url", "https://example.com/hook", "--idempotency-key", "k1", "--ns", "team",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{ID}\n"
    assert result.stderr == ""
    assert api.calls == [
        (
            "invoke_async",
            "POST",
            "/fn-async/team/resize/thumb",
            {
                "content": b"x",
                "headers": [],
                "callback_url": "https://example.com/hook",
                "idempotency_key": "k1",
            },
        )
    ]


def test_invoke_async_defaults_to_post_and_honours_method(api: FakeApi) -> None:
    assert _run("invoke", "resize", "--async").exit_code == 0
    assert _run("invoke", "resize", "--async", "-X", "put").exit_code == 0
    assert [call[1] for call in api.calls] == ["POST", "PUT"]


def test_invoke_async_json_adds_the_location(api: FakeApi) -> None:
    result = _run("invoke", "resize", "--async", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "id": ID,
        "status": "queued",
        "location": f"/api/v1/invocations/{ID}",
    }


def test_invoke_async_wait_prints_the_result_body(api: FakeApi) -> None:
    body = base64.b64encode(b"\x00binary\xff").decode()
    result = {"status": 200, "headers": [], "body": body, "body_base64": True}
    api.answers = iter(
        [_info(status="queued", result=None), _info(status="succeeded", result=result)]
    )
    run = _run("invoke", "resize", "--async", "--wait")
    assert run.exit_code == 0, run.output
    assert run.stdout_bytes == b"\x00binary\xff"
    assert [call[0] for call in api.calls] == ["invoke_async", "invocation", "invocation"]


def test_invoke_async_wait_on_a_dead_one(api: FakeApi) -> None:
    run = _run("invoke", "resize", "--async", "--wait")
    assert run.exit_code == 3
    assert run.stdout == ""
    assert run.stderr == (f"upstream down\nerror: invocation {ID} dead: 5xx after 3 attempts\n")


@pytest.mark.parametrize(
    ("status", "code"),
    [("succeeded", 0), ("failed", 3), ("dead", 3), ("expired", 3), ("cancelled", 1)],
)
def test_invocations_get_wait_exit_codes(api: FakeApi, status: str, code: int) -> None:
    api.answers = iter([_info(status=status)])
    result = _run("invocations", "get", ID, "--wait")
    assert result.exit_code == code, result.output
    assert f"status           {status}" in result.stdout


def test_invocations_get_wait_timeout(api: FakeApi) -> None:
    api.answers = iter([_info(status="running", result=None)])
    result = _run("invocations", "get", ID, "--wait", "--timeout", "0")
    assert result.exit_code == 4
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: invocation {ID} is still running after 0s")


def test_invocations_get_json_is_the_servers(api: FakeApi) -> None:
    result = _run("invocations", "get", ID, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == _info()


def test_dlq_replay_all_prints_how_many_and_which(api: FakeApi) -> None:
    result = _run("dlq", "replay", "--all", "resize")
    assert result.stdout == f"replayed 2 dead invocation(s) of resize\n{ID}\n{OTHER}\n"


def test_dlq_replay_one(api: FakeApi) -> None:
    assert _run("dlq", "replay", ID).stdout == f"replayed {ID} (queued)\n"


def test_dlq_purge_without_a_terminal_does_not_ask(api: FakeApi) -> None:
    result = _run("dlq", "purge", "resize")
    assert result.exit_code == 0, result.output
    assert result.stdout == "purged 7 dead invocation(s) of resize\n"


def test_dlq_purge_asks_in_a_terminal(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "_interactive", lambda: True)
    result = CliRunner().invoke(main.app, ["dlq", "purge", "resize"], input="n\n")
    assert result.exit_code == 1
    assert "Delete every dead invocation of resize (namespace default)?" in result.output
    assert api.calls == []


def test_dlq_ls_empty(api: FakeApi) -> None:
    assert _run("dlq", "ls", "resize").stdout == "no dead invocations of resize\n"
