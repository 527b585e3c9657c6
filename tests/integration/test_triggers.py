"""Event triggers against a real server and a real NATS JetStream: ember.yaml and `ember
triggers`, the CloudEvents each function gets, filters, failures through the async queue,
batches, and what a deploy, a removal and a kill -9 do to them. The function under test forwards
every request it gets to a recorder in this process (`Recorder`), so the test sees exactly what
it saw. (Each other broker's source is tested against its real server in tests/unit, and end to
end in test_trigger_sources.py.)"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.brokers.nats import Nats as KillableNats
from tests.integration.conftest import EmberServer, make_function, wait_for
from tests.natsserver import NatsServer

FORWARD = """
import base64
import json
import urllib.request

import ember

def handle(req, ctx):
    seen = {{"headers": dict(req.headers), "body": req.body.decode("latin-1")}}
    request = urllib.request.Request("{url}", data=json.dumps(seen).encode(), method="POST")
    urllib.request.urlopen(request, timeout=10).read()
    if req.headers.get("ce-subject", "").endswith("fail") or req.body == b"please fail":
        return ember.Response("refused", 500)
    if req.headers.get("content-type", "").startswith("application/cloudevents-batch"):
        bad = [e["id"] for e in json.loads(req.body) if data(e) == b'"bad"']
        return {{"failed": bad}}
    return {{"ok": True}}

def data(event):
    return base64.b64decode(event["data_base64"]) if "data_base64" in event else event["data"]
"""


class Recorder:
    """An HTTP server on 127.0.0.1 that keeps what the functions forward."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        lock = threading.Lock()
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with lock:
                    seen.append(json.loads(body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def of(self, subject: str) -> list[dict[str, Any]]:
        return [s for s in self.seen if s["headers"].get("ce-subject") == subject]

    def wait(self, subject: str, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.of(subject)) >= count, timeout, f"{count} events on {subject}")
        return self.of(subject)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.http.shutdown()
    rec.http.server_close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmberServer]:
    srv = EmberServer(tmp_path_factory.mktemp("home"), []).start()
    yield srv
    code = srv.stop()
    srv.http.close()
    srv.api.close()
    assert code == 0, srv.output()


def nats_call(url: str, body: Callable[[Any], Any]) -> Any:
    async def main() -> Any:
        nc = await nats.connect(url)
        try:
            return await body(nc)
        finally:
            await nc.close()

    return asyncio.run(main())


def stream(url: str, name: str, subjects: list[str]) -> None:
    async def add(nc: Any) -> None:
        await nc.jetstream().add_stream(name=name, subjects=subjects)

    nats_call(url, add)


def publish(url: str, items: list[tuple[str, bytes]]) -> None:
    async def send(nc: Any) -> None:
        js = nc.jetstream()
        for subject, data in items:
            await js.publish(subject, data)

    nats_call(url, send)


def unread(url: str, stream_name: str) -> int:
    """Messages of the stream no consumer has been handed yet (summed over its consumers)."""

    async def pending(nc: Any) -> int:
        js = nc.jetstream()
        total = 0
        for consumer in await js.consumers_info(stream_name):
            total += consumer.num_pending
        return total

    return int(nats_call(url, pending))


def deploy(server: EmberServer, root: Path, name: str, url: str, manifest: str, *args: str) -> Any:
    body = "".join(f"    {line}\n" for line in manifest.strip().splitlines())
    directory = make_function(root, name, FORWARD.format(url=url), f"functions:\n  {name}:\n{body}")
    return server.cli("deploy", str(directory), *args, check=False)


def triggers(server: EmberServer, fn: str) -> dict[str, dict[str, Any]]:
    resp = server.api.get(f"/api/v1/functions/{fn}/triggers")
    assert resp.status_code == 200, resp.text
    return {t["name"]: t for t in resp.json()["triggers"]}


def test_jetstream_events_arrive_as_cloudevents_and_filters_count_the_rest(
    server: EmberServer, broker: NatsServer, recorder: Recorder, tmp_path: Path
) -> None:
    stream(broker.url, "ORDERS", ["orders.>"])
    done = deploy(
        server,
        tmp_path,
        "orders",
        recorder.url,
        f"""
triggers:
  - type: jetstream
    name: orders
    url: {broker.url}
    stream: ORDERS
    filter: [{{attribute: subject, prefix: orders.eu.}}]
""",
    )
    assert done.returncode == 0, done.stderr.decode()
    wait_for(lambda: triggers(server, "orders")["orders"]["state"] == "running", 10)
    publish(
        broker.url, [("orders.eu.1", b'{"n": 1}'), ("orders.us.2", b"{}"), ("orders.eu.3", b"x")]
    )
    first, third = recorder.wait("orders.eu.1", 1)[0], recorder.wait("orders.eu.3", 1)[0]
    headers = first["headers"]
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-id"] == "ORDERS-1"
    assert headers["ce-type"] == "io.ember.jetstream.message"
    assert headers["ce-source"].startswith("nats://127.0.0.1:")
    assert headers["ce-time"] and first["body"] == '{"n": 1}'
    assert third["headers"]["ce-id"] == "ORDERS-3"
    wait_for(lambda: triggers(server, "orders")["orders"]["delivered"] == 2, 10)
    view = triggers(server, "orders")["orders"]
    assert (view["filtered"], view["failed"], view["lag"]) == (1, 0, 0)
    assert recorder.of("orders.us.2") == []
    ls = server.cli("triggers", "ls", "orders").stdout.decode()
    assert "orders" in ls and "running" in ls
    metrics = server.http.get("/metrics").text
    labels = 'function="orders",namespace="default",trigger="orders"'
    assert f'ember_trigger_events_total{{{labels},outcome="filtered"}} 1' in metrics


def test_a_new_revision_keeps_its_triggers_and_delivers_each_event_once(
    server: EmberServer, broker: NatsServer, recorder: Recorder, tmp_path: Path
) -> None:
    stream(broker.url, "KEEP", ["keep.>"])
    manifest = (
        f"triggers: [{{type: jetstream, url: '{broker.url}', stream: KEEP}}]\nenv: {{V: '1'}}"
    )
    assert deploy(server, tmp_path, "keep", recorder.url, manifest).returncode == 0
    before = triggers(server, "keep")["jetstream"]
    publish(broker.url, [("keep.a", b"1")])
    recorder.wait("keep.a", 1)
    changed = manifest.replace("V: '1'", "V: '2'")
    assert deploy(server, tmp_path / "2", "keep", recorder.url, changed).returncode == 0
    assert server.api.get("/api/v1/functions/keep").json()["revision"] == 2
    after = triggers(server, "keep")
    assert list(after) == ["jetstream"] and after["jetstream"]["id"] == before["id"]
    publish(broker.url, [("keep.b", b"2")])
    recorder.wait("keep.b", 1)
    wait_for(lambda: triggers(server, "keep")["jetstream"]["delivered"] == 2, 10)  # not restarted
    assert len(recorder.of("keep.a")) == 1 and len(recorder.of("keep.b")) == 1


def test_a_failing_event_follows_the_async_settings_into_the_dead_letters(
    server: EmberServer, broker: NatsServer, recorder: Recorder, tmp_path: Path
) -> None:
    stream(broker.url, "PAY", ["pay.>"])
    manifest = f"""
async: {{retries: 1, backoff: {{initial: 0.1, max: 0.1}}}}
triggers: [{{type: jetstream, url: '{broker.url}', stream: PAY}}]
"""
    assert deploy(server, tmp_path, "pay", recorder.url, manifest).returncode == 0
    publish(broker.url, [("pay.fail", b"boom")])
    assert len(recorder.wait("pay.fail", 2)) == 2  # the first attempt, and its one retry

    def dead() -> list[dict[str, Any]]:
        return list(server.api.get("/api/v1/functions/pay/dlq").json()["invocations"])

    wait_for(lambda: len(dead()) == 1, 10, "the event in the dead letters")
    (letter,) = dead()
    assert letter["status"] == "dead" and len(letter["attempts"]) == 2
    assert letter["attempts"][0]["status"] == 500
    assert triggers(server, "pay")["jetstream"]["queued"] == 1
    shown = server.cli("dlq", "show", letter["id"]).stdout.decode()
    assert "ce-id" in shown and "PAY-1" in shown
    assert unread(broker.url, "PAY") == 0  # acked: JetStream keeps nothing to send again


def test_a_batch_reports_per_event_results_and_only_the_bad_one_goes_again(
    server: EmberServer, broker: NatsServer, recorder: Recorder, tmp_path: Path
) -> None:
    stream(broker.url, "BATCH", ["batch.>"])
    manifest = f"""
triggers:
  - {{type: jetstream, url: '{broker.url}', stream: BATCH,
     delivery: {{batch: {{size: 3, max_wait: 2s}}}}}}
"""
    assert deploy(server, tmp_path, "batch", recorder.url, manifest).returncode == 0
    publish(broker.url, [("batch.x", b'"good"'), ("batch.x", b'"bad"'), ("batch.x", b'"fine"')])
    wait_for(lambda: len(recorder.of("batch.x")) == 1, 20, "the bad event alone")
    batches = [
        json.loads(s["body"])
        for s in recorder.seen
        if s["headers"].get("content-type", "").startswith("application/cloudevents-batch")
    ]
    assert [[data(e) for e in batch] for batch in batches] == [[b'"good"', b'"bad"', b'"fine"']]
    (single,) = recorder.of("batch.x")
    assert single["body"] == '"bad"' and single["headers"]["ce-id"] == batches[0][1]["id"]
    wait_for(lambda: triggers(server, "batch")["jetstream"]["queued"] == 1, 10)
    assert triggers(server, "batch")["jetstream"]["delivered"] == 2


def data(event: dict[str, Any]) -> bytes:
    """A structured event's data as bytes (without a datacontenttype it is data_base64)."""
    return base64.b64decode(event["data_base64"]) if "data_base64" in event else event["data"]


def test_bad_triggers_are_refused_with_422_and_the_old_revision_keeps_serving(
    server: EmberServer, recorder: Recorder, tmp_path: Path
) -> None:
    assert deploy(server, tmp_path, "strict", recorder.url, "env: {V: '1'}").returncode == 0
    cases = [
        ("triggers: [{type: carrier-pigeon}]", "trigger 'carrier-pigeon' (carrier-pigeon) type"),
        ("triggers: [{type: cron, schedule: '61 * * * *'}]", "trigger 'cron' (cron) schedule"),
        ("triggers: [{type: webhook}]", "trigger 'webhook' (webhook) secret"),
        (
            "triggers: [{type: jetstream, url: 'nats://127.0.0.1:1', stream: S}]",
            "trigger 'jetstream' (jetstream) url",
        ),
        (
            "triggers: [{type: cron, schedule: '@every 1s',"
            " filter: [{attribute: 'B!', exact: x}]}]",
            "trigger 'cron' (cron) filter[0].attribute",
        ),
    ]
    for n, (manifest, named) in enumerate(cases):
        done = deploy(server, tmp_path / str(n), "strict", recorder.url, manifest)
        out = done.stderr.decode() + done.stdout.decode()
        assert done.returncode != 0 and named in out, out
        assert "--allow-trigger-errors" in out
        assert server.api.get("/api/v1/functions/strict").json()["revision"] == 1
    bad = "triggers: [{type: cron, schedule: 'not a schedule'}]"
    allowed = deploy(server, tmp_path / "x", "strict", recorder.url, bad, "--allow-trigger-errors")
    assert allowed.returncode == 0, allowed.stderr.decode()
    view = triggers(server, "strict")["cron"]
    assert view["state"] == "failing" and "schedule" in view["error"]
    assert "failing" in server.cli("triggers", "ls", "strict").stdout.decode()


def test_cron_ticks_reach_the_function(
    server: EmberServer, recorder: Recorder, tmp_path: Path
) -> None:
    manifest = "triggers: [{type: cron, name: tick, schedule: '@every 1s', data: {a: 1}}]"
    assert deploy(server, tmp_path, "ticker", recorder.url, manifest).returncode == 0
    view = triggers(server, "ticker")["tick"]

    def ticks() -> list[dict[str, Any]]:
        return [s for s in recorder.seen if s["headers"].get("ce-id", "").startswith(view["id"])]

    wait_for(lambda: len(ticks()) >= 2, 10, "two ticks")
    first = ticks()[0]
    assert first["headers"]["ce-type"] == "io.ember.cron.tick"
    assert json.loads(first["body"]) == {"a": 1}
    assert first["headers"]["content-type"] == "application/json"


def test_a_signed_webhook_is_delivered_and_a_bad_signature_is_refused(
    server: EmberServer, recorder: Recorder, tmp_path: Path
) -> None:
    secret = "s3cret-of-16-chars-or-more"
    manifest = f"triggers: [{{type: webhook, name: gh, signature: github, secret: '{secret}'}}]"
    assert deploy(server, tmp_path, "hooked", recorder.url, manifest).returncode == 0
    view = triggers(server, "hooked")["gh"]
    assert view["config"]["secret"] == "***" and view["hook"] == f"/hooks/{view['id']}"
    body = b'{"action": "opened"}'
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "X-Hub-Signature-256": signature,
        "X-GitHub-Event": "pull_request",
        "X-GitHub-Delivery": "d-1",
        "Content-Type": "application/json",
    }
    resp = server.http.post(view["hook"], content=body, headers=headers)
    assert resp.status_code == 202, resp.text
    (seen,) = [s for s in recorder.seen if s["headers"].get("ce-id") == "d-1"]
    assert seen["headers"]["ce-type"] == "com.github.pull_request"
    assert json.loads(seen["body"]) == {"action": "opened"}
    wrong = {**headers, "X-Hub-Signature-256": "sha256=" + "0" * 64, "X-GitHub-Delivery": "d-2"}
    assert server.http.post(view["hook"], content=body, headers=wrong).status_code == 401
    assert [s for s in recorder.seen if s["headers"].get("ce-id") == "d-2"] == []
    assert server.http.post("/hooks/tr0000", content=body, headers=headers).status_code == 404


def test_the_cli_adds_pauses_resumes_and_removes_a_trigger(
    server: EmberServer, broker: NatsServer, recorder: Recorder, tmp_path: Path
) -> None:
    stream(broker.url, "CLI", ["cli.>"])
    assert deploy(server, tmp_path, "clifn", recorder.url, "env: {V: '1'}").returncode == 0
    added = server.cli(
        "triggers",
        "add",
        "clifn",
        "--type",
        "jetstream",
        "--name",
        "feed",
        "--set",
        f"url={broker.url}",
        "--set",
        "stream=CLI",
        "--filter",
        "subject^=cli.",
    )
    assert "feed" in added.stdout.decode()
    publish(broker.url, [("cli.1", b"1")])
    recorder.wait("cli.1", 1)
    server.cli("triggers", "pause", "clifn", "feed")
    assert triggers(server, "clifn")["feed"]["state"] == "paused"
    publish(broker.url, [("cli.2", b"2")])
    assert unread(broker.url, "CLI") == 1  # paused: nobody takes it
    server.cli("triggers", "resume", "clifn", "feed")
    recorder.wait("cli.2", 1)
    # A trigger added with the CLI survives a deploy of the function's ember.yaml
    assert deploy(server, tmp_path / "2", "clifn", recorder.url, "env: {V: '2'}").returncode == 0
    assert list(triggers(server, "clifn")) == ["feed"]
    server.cli("triggers", "rm", "clifn", "feed")
    assert triggers(server, "clifn") == {}
    publish(broker.url, [("cli.3", b"3")])
    assert unread(broker.url, "CLI") == 1 and recorder.of("cli.3") == []


def test_removing_the_function_stops_its_triggers(
    server: EmberServer, broker: NatsServer, recorder: Recorder, tmp_path: Path
) -> None:
    stream(broker.url, "GONE", ["gone.>"])
    manifest = f"triggers: [{{type: jetstream, url: '{broker.url}', stream: GONE}}]"
    assert deploy(server, tmp_path, "gone", recorder.url, manifest).returncode == 0
    publish(broker.url, [("gone.1", b"1")])
    recorder.wait("gone.1", 1)
    server.cli("rm", "gone")
    listed = server.api.get("/api/v1/triggers").json()["triggers"]
    assert listed and all(t["function"] != "default/gone" for t in listed)
    publish(broker.url, [("gone.2", b"2")])
    assert unread(broker.url, "GONE") == 1 and recorder.of("gone.2") == []


def test_a_killed_server_loses_no_event(
    broker: NatsServer, recorder: Recorder, tmp_path: Path
) -> None:
    """kill -9 while 200 events stream in: after a restart every one has reached the function
    (at least once), because none is acked before the function answered."""
    stream(broker.url, "KILL", ["kill.>"])
    srv = EmberServer(tmp_path / "home", []).start()
    try:
        manifest = f"triggers: [{{type: jetstream, url: '{broker.url}', stream: KILL}}]"
        assert deploy(srv, tmp_path, "killed", recorder.url, manifest).returncode == 0
        publish(broker.url, [(f"kill.{i}", b"x") for i in range(200)])

        def seen() -> int:
            return sum("kill." in s["headers"].get("ce-subject", "") for s in recorder.seen)

        wait_for(lambda: seen() >= 50, 20, "50 events before the kill")
        srv.stop(signal.SIGKILL)
        srv.start()
        for i in range(200):
            recorder.wait(f"kill.{i}", 1, timeout=30)
    finally:
        srv.stop()
        srv.http.close()
        srv.api.close()


def test_a_broker_killed_mid_stream_shows_failing_reconnects_and_loses_nothing(
    server: EmberServer, recorder: Recorder, tmp_path: Path
) -> None:
    """kill -9 of nats-server while 200 events stream in: the trigger says failing (with the
    error and since when), reconnects once the broker is back, and every event reaches the
    function: the acked ones were stored by the broker, the others come again."""
    with KillableNats(tmp_path / "nats") as broker:
        stream(broker.url, "FLAKY", ["flaky.>"])
        manifest = f"triggers: [{{type: jetstream, url: '{broker.url}', stream: FLAKY}}]"
        assert deploy(server, tmp_path, "flaky", recorder.url, manifest).returncode == 0
        publish(broker.url, [(f"flaky.{i}", b"x") for i in range(200)])

        def seen() -> int:
            return sum("flaky." in s["headers"].get("ce-subject", "") for s in recorder.seen)

        wait_for(lambda: seen() >= 20, 20, "20 events before the kill")
        broker.kill()
        wait_for(lambda: triggers(server, "flaky")["jetstream"]["state"] == "failing", 20)
        view = triggers(server, "flaky")["jetstream"]
        assert view["error"] and view["since"] > 0
        broker.start()
        wait_for(lambda: triggers(server, "flaky")["jetstream"]["state"] == "running", 30)
        for i in range(200):
            recorder.wait(f"flaky.{i}", 1, timeout=30)
        wait_for(lambda: unread(broker.url, "FLAKY") == 0, 20, "every event acked")


def test_cron_catchup_runs_a_tick_missed_while_down_once_never_twice(
    recorder: Recorder, tmp_path: Path
) -> None:
    srv = EmberServer(tmp_path / "home", []).start()
    try:
        manifest = "triggers: [{type: cron, name: beat, schedule: '@every 2s', catchup: true}]"
        assert deploy(srv, tmp_path, "beat", recorder.url, manifest).returncode == 0
        trigger_id = triggers(srv, "beat")["beat"]["id"]

        def ticks() -> list[dict[str, Any]]:
            prefix = f"{trigger_id}-"
            return [s for s in recorder.seen if s["headers"].get("ce-id", "").startswith(prefix)]

        wait_for(lambda: len(ticks()) >= 1, 10, "a first tick")
        assert srv.stop() == 0
        stopped = time.time()
        time.sleep(4.5)  # the server is down across two ticks of the schedule
        srv.start()
        started = time.time()

        def missed() -> list[dict[str, Any]]:
            return [t for t in ticks() if stopped < _unix(t["headers"]["ce-time"]) < started]

        wait_for(lambda: len(missed()) >= 1, 10, "the missed tick, caught up")
        (caught,) = missed()  # the latest missed one only
        assert srv.stop() == 0
        srv.start()
        wait_for(lambda: len(ticks()) > len(missed()) + 2, 10, "ticks after a second restart")
        assert [t["headers"]["ce-id"] for t in ticks()].count(caught["headers"]["ce-id"]) == 1
    finally:
        srv.stop()
        srv.http.close()
        srv.api.close()


def _unix(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
