"""Async invocations against a real server, on each queue backend: SQLite (the default) and
NATS JetStream (`ember up --queue nats://...`, a real nats-server started here)."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import itertools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import GATED, EmberServer, Gate, make_function, wait_for
from tests.natsserver import NatsServer

ENDED = {"succeeded", "failed", "dead", "expired", "cancelled"}

ECHO = """
import json

def handle(req, ctx):
    return {
        "body": req.body.decode(),
        "path": req.path,
        "attempt": req.headers.get("x-ember-attempt"),
        "call": req.headers.get("x-call-id"),
    }
"""


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="module", params=["sqlite", "nats"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmberServer]:
    extra = []
    if request.param == "nats":
        nats: NatsServer = request.getfixturevalue("nats")
        extra = ["--queue", nats.url]
    srv = EmberServer(tmp_path_factory.mktemp(f"home-{request.param}"), extra).start()
    yield srv
    code = srv.stop()
    srv.http.close()
    srv.api.close()
    assert code == 0, srv.output()


@pytest.fixture
def deploy(server: EmberServer, tmp_path: Path) -> Callable[..., str]:
    names = iter(range(1000))

    def make(code: str, manifest_body: str = "", name: str | None = None) -> str:
        fn = name or f"f{next(names)}-{abs(hash(tmp_path)) % 10**6}"
        manifest = None
        if manifest_body:
            manifest = f"functions:\n  {fn}:\n" + "".join(
                f"    {line}\n" for line in manifest_body.strip().splitlines()
            )
        server.deploy(make_function(tmp_path / "src", fn, code, manifest))
        return fn

    return make


def accept(server: EmberServer, path: str, body: bytes = b"", **headers: str) -> str:
    resp = server.http.post(path, content=body, headers=headers)
    assert resp.status_code == 202, resp.text
    call = resp.json()["id"]
    assert resp.headers["location"] == f"/api/v1/invocations/{call}"
    assert resp.headers["x-call-id"] == call
    return str(call)


def get(server: EmberServer, call: str) -> dict[str, Any]:
    resp = server.api.get(f"/api/v1/invocations/{call}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def ended(server: EmberServer, call: str, timeout: float = 30) -> dict[str, Any]:
    wait_for(lambda: get(server, call)["status"] in ENDED, timeout, f"invocation {call} to end")
    return get(server, call)


def activations(server: EmberServer, fn: str, count: int) -> list[dict[str, Any]]:
    """The function's activation records, once `count` of them are written (every 0.5 s)."""

    def read() -> list[dict[str, Any]]:
        resp = server.api.get(f"/api/v1/functions/{fn}/activations")
        return list(resp.json()["activations"])

    wait_for(lambda: len(read()) >= count, 10, f"{count} activation records")
    return read()


def listed(server: EmberServer, fn: str, **params: Any) -> list[dict[str, Any]]:
    resp = server.api.get(f"/api/v1/functions/{fn}/invocations", params={"limit": 10000, **params})
    assert resp.status_code == 200, resp.text
    return list(resp.json()["invocations"])


def test_an_async_call_answers_202_and_its_result_is_kept_by_id(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(ECHO)
    shapes = [
        accept(server, f"/fn-async/{fn}/x", b"one"),
        accept(server, f"/fn/{fn}/x", b"two", **{"X-Ember-Invocation-Type": "async"}),
        accept(server, f"/async-function/{fn}/x", b"three"),
    ]
    for call, sent in zip(shapes, ["one", "two", "three"], strict=True):
        inv = ended(server, call)
        assert inv["status"] == "succeeded", inv
        assert (inv["function"], inv["namespace"]) == (fn, "default")
        assert [(a["number"], a["outcome"], a["status"]) for a in inv["attempts"]] == [
            (1, "ok", 200)
        ]
        assert inv["result"]["status"] == 200
        answer = json.loads(inv["result"]["body"])
        assert answer == {"body": sent, "path": "/x", "attempt": "1", "call": call}
        assert inv["request"]["body"] == sent and inv["request"]["method"] == "POST"
    records = activations(server, fn, 3)
    assert sorted((r["call_id"], r["attempt"]) for r in records) == sorted(
        (call, 1) for call in shapes
    )
    assert {i["id"] for i in listed(server, fn, status="succeeded")} == set(shapes)


def test_refusals_come_before_anything_is_queued(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(ECHO)
    unknown = server.http.post("/fn-async/no-such-function", content=b"x")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")
    no_alias = server.http.post(f"/fn-async/{fn}@nope", content=b"x")
    assert no_alias.status_code == 404
    big = b"x" * (1024 * 1024 + 1)
    assert server.http.post(f"/fn/{fn}", content=big).status_code == 200  # 6 MB when sync
    too_big = server.http.post(f"/fn-async/{fn}", content=big)
    assert too_big.status_code == 413
    assert "async invocation's limit" in too_big.json()["error"]["message"]
    for url in ["ftp://example.com/x", "/relative", "http://", "https://exa mple.com"]:
        bad = server.http.post(f"/fn-async/{fn}", headers={"X-Callback-Url": url})
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "bad_callback_url"), url
    assert listed(server, fn) == []


def test_a_private_function_needs_the_key_to_queue_and_runs_with_it(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(ECHO, "access: private")
    refused = server.http.post(f"/fn-async/{fn}", content=b"x")
    assert refused.status_code == 401
    assert listed(server, fn) == []
    resp = server.http.post(
        f"/fn-async/{fn}", content=b"x", headers={"Authorization": f"Bearer {server.admin_key}"}
    )
    assert resp.status_code == 202
    inv = ended(server, resp.json()["id"])
    assert inv["status"] == "succeeded", inv
    assert all(name != "authorization" for name, _ in inv["request"]["headers"])


FAILING = """
def handle(req, ctx):
    return ("no", int(req.path.strip("/") or 500))
"""


def test_retries_back_off_then_the_invocation_is_dead_and_can_be_replayed(
    server: EmberServer, deploy: Callable[..., str], tmp_path: Path
) -> None:
    manifest = "async: {retries: 2, backoff: {initial: 0.3s, max: 0.4s, factor: 2, jitter: 0}}"
    fn = deploy(FAILING, manifest)
    call = accept(server, f"/fn-async/{fn}/500")
    inv = ended(server, call)
    assert inv["status"] == "dead", inv
    assert "no retries left" in inv["reason"]
    attempts = inv["attempts"]
    assert [(a["number"], a["outcome"], a["status"]) for a in attempts] == [
        (1, "5xx", 500),
        (2, "5xx", 500),
        (3, "5xx", 500),
    ]
    gaps = [b["started"] - a["started"] for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.4, gaps
    dlq = server.api.get(f"/api/v1/functions/{fn}/dlq").json()["invocations"]
    assert [d["id"] for d in dlq] == [call]
    # The code is fixed: the dead letter runs again on the new revision.
    deploy(ECHO, manifest, name=fn)
    replayed = server.api.post(f"/api/v1/invocations/{call}/replay")
    assert (replayed.status_code, replayed.json()["status"]) == (200, "queued")
    again = ended(server, call)
    assert again["status"] == "succeeded", again
    assert [a["outcome"] for a in again["attempts"]] == ["ok"]
    assert server.api.post(f"/api/v1/invocations/{call}/replay").status_code == 409


def test_dead_letters_are_replayed_all_at_once_or_purged(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(FAILING, "async: {retries: 0}")
    calls = [accept(server, f"/fn-async/{fn}/503") for _ in range(3)]
    for call in calls:
        assert ended(server, call)["status"] == "dead"
    none = server.api.post(f"/api/v1/functions/{fn}/dlq/replay", json={"ids": []})
    assert none.json() == {"replayed": []}
    replayed = server.api.post(f"/api/v1/functions/{fn}/dlq/replay", json={"all": True})
    assert sorted(replayed.json()["replayed"]) == sorted(calls)
    for call in calls:
        assert ended(server, call)["status"] == "dead"
    purged = server.api.delete(f"/api/v1/functions/{fn}/dlq")
    assert purged.json() == {"purged": 3}
    assert server.api.get(f"/api/v1/functions/{fn}/dlq").json()["invocations"] == []
    assert server.api.get(f"/api/v1/invocations/{calls[0]}").status_code == 404


def test_retry_on_picks_what_is_retried_and_retry_after_is_honoured(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(FAILING, "async: {retries: 3}")
    refused = ended(server, accept(server, f"/fn-async/{fn}/400"))
    assert refused["status"] == "failed", refused
    assert [a["outcome"] for a in refused["attempts"]] == ["error"]
    assert "retry_on" in refused["reason"]

    slow_down = deploy(
        'def handle(req, ctx):\n    return ember.Response("later", 429, {"Retry-After": "1"})\n'
        "import ember\n",
        "async: {retries: 1, backoff: {initial: 0.01s, jitter: 0}}",
    )
    inv = ended(server, accept(server, f"/fn-async/{slow_down}"))
    assert [a["outcome"] for a in inv["attempts"]] == ["429", "429"]
    assert inv["attempts"][1]["started"] - inv["attempts"][0]["started"] >= 1.0

    only_503 = deploy(FAILING, "async: {retries: 2, retry_on: [503], backoff: {initial: 0.01s}}")
    assert [
        a["status"] for a in ended(server, accept(server, f"/fn-async/{only_503}/503"))["attempts"]
    ] == [503, 503, 503]
    assert len(ended(server, accept(server, f"/fn-async/{only_503}/500"))["attempts"]) == 1


FLAKY = """
import os, signal, time

def handle(req, ctx):
    attempt = req.headers["x-ember-attempt"]
    if attempt == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 of the instance, mid-invocation
    if attempt == "2":
        time.sleep(5)  # past its timeout
    return "third time"
"""


def test_a_killed_instance_and_a_timeout_are_failed_attempts_and_retried(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(FLAKY, "timeout: 1s\nasync: {retries: 2, backoff: {initial: 0.01s}}")
    inv = ended(server, accept(server, f"/fn-async/{fn}"))
    assert inv["status"] == "succeeded", inv
    assert [(a["outcome"], a["status"], a["error"]) for a in inv["attempts"]] == [
        ("crash", 502, "crashed"),
        ("timeout", 504, "timeout"),
        ("ok", 200, ""),
    ]
    assert inv["result"]["body"] == "third time"


HELD = (
    GATED
    + """
def handle(req, ctx):
    gate(req)
    return req.body
"""
)


def test_max_age_expires_what_waited_too_long_and_cancel_takes_a_queued_one(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(HELD, "scale: {max: 1}\nasync: {max_age: 1s}")
    with Gate() as gate:
        first = accept(server, f"/fn-async/{fn}?gate={gate.port}", b"first")
        gate.wait(1)
        stale = accept(server, f"/fn-async/{fn}", b"stale")
        cancelled = accept(server, f"/fn-async/{fn}", b"cancelled")
        assert get(server, stale)["status"] == "queued"
        running = server.api.delete(f"/api/v1/invocations/{first}")
        assert (running.status_code, running.json()["error"]["code"]) == (409, "not_queued")
        gone = server.api.delete(f"/api/v1/invocations/{cancelled}")
        assert (gone.status_code, gone.json()["status"]) == (200, "cancelled")
        time.sleep(1.1)  # the stale one is now older than max_age
    assert ended(server, first)["status"] == "succeeded"
    expired = ended(server, stale)
    assert (expired["status"], expired["attempts"]) == ("expired", [])
    assert "max_age" in expired["reason"]
    assert get(server, cancelled)["status"] == "cancelled"
    time.sleep(1.0)  # two flushes of the records: any attempt of the others would be there
    assert [r["call_id"] for r in activations(server, fn, 1)] == [first]


def test_an_idempotency_key_queues_once(server: EmberServer, deploy: Callable[..., str]) -> None:
    fn = deploy(ECHO)
    first = server.http.post(f"/fn-async/{fn}", content=b"a", headers={"Idempotency-Key": "k-1"})
    again = server.http.post(f"/fn-async/{fn}", content=b"b", headers={"Idempotency-Key": "k-1"})
    other = server.http.post(f"/fn-async/{fn}", content=b"c", headers={"Idempotency-Key": "k-2"})
    assert first.status_code == again.status_code == other.status_code == 202
    assert again.json()["id"] == first.json()["id"] != other.json()["id"]
    assert again.headers["x-ember-idempotent-replay"] == "true"
    assert "x-ember-idempotent-replay" not in first.headers
    for call in (first.json()["id"], other.json()["id"]):
        ended(server, call)
    assert sorted(i["request"]["body"] for i in listed(server, fn)) == ["a", "c"]


class Recorder(http.server.ThreadingHTTPServer):
    """A callback target on 127.0.0.1: records each POST; answers 503 to the first `fail`."""

    def __init__(self, fail: int = 0) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.fail = fail
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                recorder.posts.append((self.path, dict(self.headers), body))
                failing = len(recorder.posts) <= recorder.fail
                self.send_response(503 if failing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def test_the_callback_url_gets_the_result_and_is_retried_a_bounded_number_of_times(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(ECHO)
    with Recorder(fail=2) as hook:
        call = accept(server, f"/fn-async/{fn}/x", b"hi", **{"X-Callback-Url": hook.url + "/cb"})
        wait_for(lambda: len(hook.posts) == 3, 30, "the callback's third try")
        path, headers, body = hook.posts[-1]
        assert path == "/cb"
        assert headers["X-Call-Id"] == call
        assert headers["X-Function-Status"] == "200"
        assert float(headers["X-Duration-Seconds"]) > 0
        assert json.loads(body)["body"] == "hi"
        assert [p[1]["X-Call-Id"] for p in hook.posts] == [call] * 3
    with Recorder(fail=100) as never:
        call = accept(server, f"/fn-async/{fn}", **{"X-Callback-Url": never.url})
        ended(server, call)
        wait_for(lambda: len(never.posts) >= 4, 30, "four tries")
        time.sleep(5)  # longer than the next wait would be: no fifth try comes
        assert len(never.posts) == 4


def test_destinations_get_the_record_on_success_and_on_failure(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    audit = deploy(ECHO)
    with Recorder() as hook:
        fn = deploy(
            FAILING,
            f"async: {{retries: 0, on_success: {{function: {audit}}}, "
            f"on_failure: {{url: '{hook.url}/failed'}}}}",
        )
        good = accept(server, f"/fn-async/{fn}/200")
        bad = accept(server, f"/fn-async/{fn}/500")
        wait_for(lambda: len(hook.posts) == 1, 30, "the failure destination")
        path, _, body = hook.posts[0]
        record = json.loads(body)
        assert path == "/failed"
        assert (record["id"], record["status"], record["function"]) == (bad, "dead", fn)
        assert record["result"]["status"] == 500
        assert [a["outcome"] for a in record["attempts"]] == ["5xx"]
    wait_for(lambda: len(listed(server, audit, status="succeeded")) == 1, 30, "the audit call")
    (audited,) = listed(server, audit)
    sent = json.loads(json.loads(audited["result"]["body"])["body"])
    assert (sent["id"], sent["status"], sent["result"]["status"]) == (good, "succeeded", 200)
    assert sent["request"]["path"] == f"/fn/{fn}/200"


def test_metrics_show_the_depth_and_age_of_the_queue(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(HELD, "scale: {max: 1}")
    with Gate() as gate:
        accept(server, f"/fn-async/{fn}?gate={gate.port}")
        gate.wait(1)
        for _ in range(5):
            accept(server, f"/fn-async/{fn}")

        def line(name: str) -> float:
            text = server.http.get("/metrics").text
            prefix = f'{name}{{function="{fn}",namespace="default"}} '
            values = [
                float(row[len(prefix) :]) for row in text.splitlines() if row.startswith(prefix)
            ]
            return values[0] if values else -1.0

        wait_for(lambda: line("ember_async_queue_depth") == 5, 10, "a depth of 5")
        assert line("ember_async_oldest_age_seconds") > 0


def test_ember_rm_forgets_the_queue_of_the_function(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(HELD, "scale: {max: 1}")
    with Gate() as gate:
        accept(server, f"/fn-async/{fn}?gate={gate.port}")
        gate.wait(1)
        queued = accept(server, f"/fn-async/{fn}")
        server.cli("rm", fn)
        wait_for(
            lambda: server.api.get(f"/api/v1/invocations/{queued}").status_code == 404,
            10,
            "the queued invocation to go",
        )


def test_the_server_survives_a_backlog_call_that_crashes_ember_side(
    server: EmberServer,
) -> None:
    """Garbage at the async prefixes is answered, never a crash."""
    for path in ["/fn-async/", "/fn-async//x", "/async-function/", "/fn-async/%00"]:
        resp = server.http.post(path, content=b"x")
        assert resp.status_code in (404,), (path, resp.status_code, resp.text)
    assert server.http.get("/healthz").status_code == 200


def test_the_cli_queues_waits_lists_and_handles_dead_letters(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy(FAILING, "async: {retries: 0}")
    queued = server.cli("invoke", fn, "--path", "/200", "--data", "hello", "--async")
    call = queued.stdout.decode().strip()
    assert len(call) == 32 and get(server, call)["request"]["body"] == "hello"
    waited = server.cli("invocations", "get", call, "--wait")
    shown_text = waited.stdout.decode()
    assert "succeeded" in shown_text and shown_text.endswith("no\n"), shown_text
    listing = server.cli("invocations", fn).stdout.decode()
    assert call[:8] in listing and "succeeded" in listing

    dead = server.cli("invoke", fn, "--path", "/500", "--async").stdout.decode().strip()
    failed = server.cli("invocations", "get", dead, "--wait", check=False)
    assert failed.returncode == 3, failed
    assert dead[:8] in server.cli("dlq", "ls", fn).stdout.decode()
    shown = server.cli("dlq", "show", dead, "--json").stdout
    assert json.loads(shown)["status"] == "dead"
    assert json.loads(shown)["request"]["path"] == f"/fn/{fn}/500"
    replayed = server.cli("dlq", "replay", dead).stdout.decode()
    assert dead in replayed
    assert ended(server, dead)["status"] == "dead"
    purged = server.cli("dlq", "purge", fn, "--yes").stdout.decode()
    assert "1" in purged
    assert server.api.get(f"/api/v1/invocations/{dead}").status_code == 404
    missing = server.cli("invoke", "no-such-fn", "--async", check=False)
    assert missing.returncode != 0 and b"no function named" in missing.stderr


def test_a_result_beyond_the_async_limit_is_kept_cut_and_says_so(
    server: EmberServer, deploy: Callable[..., str]
) -> None:
    fn = deploy("def handle(req, ctx):\n    return b'r' * (3 * 1024 * 1024)\n")
    inv = ended(server, accept(server, f"/fn-async/{fn}"))
    assert inv["status"] == "succeeded", inv
    headers = dict(inv["result"]["headers"])
    assert headers["x-ember-result-truncated"] == str(3 * 1024 * 1024)
    kept = len(inv["result"]["body"])
    assert 0 < kept <= 1024 * 1024


def test_a_graceful_stop_with_a_backlog_exits_and_queues_it_again_untouched(
    deploy: Callable[..., str], tmp_path: Path, server: EmberServer
) -> None:
    """Invocations a lane took ahead of running are queued again as they were: no attempt."""
    with contextlib.ExitStack() as stack:
        queue = []
        if server.extra:  # a NATS server of its own: one Ember server owns a queue
            queue = ["--queue", stack.enter_context(NatsServer(tmp_path / "nats")).url]
        own = EmberServer(tmp_path / "own-home", queue).start()
        stack.callback(own.api.close)
        stack.callback(own.http.close)
        stack.callback(own.stop, signal.SIGKILL)
        _stop_and_restart_with_a_backlog(own, tmp_path)


def _answers(server: EmberServer) -> bool:
    try:
        server.http.get("/healthz", timeout=1)
    except httpx.HTTPError:
        return False
    return True


def _stop_and_restart_with_a_backlog(own: EmberServer, tmp_path: Path) -> None:
    manifest = "functions:\n  held:\n    scale: {max: 1}\n"
    code = GATED + "def handle(req, ctx):\n    gate(req)\n    time.sleep(1.5)\n    return 'ok'\n"
    own.deploy(make_function(tmp_path / "own", "held", code, manifest))
    with Gate() as gate:
        # Held, then 1.5 s more: it is still running when the server reaches its pool's stop.
        first = accept(own, f"/fn-async/held?gate={gate.port}")
        gate.wait(1)
        waiting = [accept(own, "/fn-async/held") for _ in range(5)]
        assert own.proc is not None
        own.proc.send_signal(signal.SIGTERM)  # no new attempt from now on
        wait_for(lambda: not _answers(own), 10, "the server to stop accepting connections")
    # The gate is open: the attempt under way ends within the grace, then the server exits.
    assert own.stop(timeout=20) == 0, own.output()
    own.start()
    assert [a["outcome"] for a in ended(own, first)["attempts"]] == ["ok"]
    for call in waiting:
        inv = ended(own, call)
        assert [a["outcome"] for a in inv["attempts"]] == ["ok"], inv


class Subscriber:
    """Messages on a NATS subject, collected by a thread of its own (nats-py on its loop)."""

    def __init__(self, url: str, subject: str) -> None:
        self.messages: list[bytes] = []
        ready = threading.Event()

        async def listen() -> None:
            import nats

            nc = await nats.connect(url)
            await nc.subscribe(subject, cb=self._got)
            await nc.flush()
            ready.set()
            while True:
                await asyncio.sleep(3600)

        threading.Thread(target=lambda: asyncio.run(listen()), daemon=True).start()
        assert ready.wait(10), "the subscription"

    async def _got(self, msg: Any) -> None:
        self.messages.append(msg.data)


def test_a_subject_destination_is_published_on_nats_and_refused_without_it(
    server: EmberServer, deploy: Callable[..., str], nats: NatsServer, tmp_path: Path
) -> None:
    manifest = "async: {on_success: {subject: ember-test.done}}"
    if not server.extra:  # SQLite: no NATS to publish to
        code = ECHO
        src = make_function(
            tmp_path / "src", "subj", code, f"functions:\n  subj:\n    {manifest}\n"
        )
        refused = server.cli("deploy", str(src), check=False)
        assert refused.returncode != 0
        assert b"needs the NATS queue" in refused.stderr, refused.stderr
        return
    listener = Subscriber(server.extra[1], "ember-test.done")
    fn = deploy(ECHO, manifest)
    call = accept(server, f"/fn-async/{fn}", b"published")
    assert ended(server, call)["status"] == "succeeded"
    wait_for(lambda: len(listener.messages) == 1, 10, "the record on the subject")
    record = json.loads(listener.messages[0])
    assert (record["id"], record["status"], record["request"]["body"]) == (
        call,
        "succeeded",
        "published",
    )
