"""Async invocations by the thousand, on each backend: `kill -9` of the server while they are
queued, arriving and running loses none; a backlog of 100,000 holds up no one else."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.producer import Produced, produce, request

from tests.integration.conftest import (
    GATED,
    EmberServer,
    Gate,
    ember_cmd,
    make_function,
    wait_for,
)
from tests.natsserver import NatsServer

BACKENDS = ["sqlite", "nats"]


@pytest.fixture(params=BACKENDS)
def queue_args(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    """`ember up` arguments for the backend; NATS: a nats-server of this test's own."""
    if request.param == "sqlite":
        yield []
        return
    with NatsServer(tmp_path / "nats") as nats:
        yield ["--queue", nats.url]


def counter(server: EmberServer, fn: str, name: str, status: str | None = None) -> float:
    labels = f'function="{fn}",namespace="default"' + (f',status="{status}"' if status else "")
    prefix = f"{name}{{{labels}}} "
    for line in server.http.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def statuses(server: EmberServer, fn: str) -> dict[str, str]:
    resp = server.api.get(f"/api/v1/functions/{fn}/invocations", params={"limit": 10000})
    assert resp.status_code == 200, resp.text
    return {i["id"]: i["status"] for i in resp.json()["invocations"]}


SLEEPY = """
import time

def handle(req, ctx):
    time.sleep(0.005)
    return "done"
"""


def test_kill_9_of_the_server_loses_no_invocation(queue_args: list[str], tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = EmberServer(home, ["--log-level", "warning", *queue_args]).start()
    try:
        server.deploy(
            make_function(
                tmp_path / "src", "work", SLEEPY, "functions:\n  work:\n    scale: {max: 4}\n"
            )
        )
        out = Produced()
        posts = [request("POST", "/fn-async/work", b"x")] * 4000
        producer = threading.Thread(target=produce, args=(server.port, posts, 32, 0.0, out))
        producer.start()
        # Some done, more running, more arriving: then the server is killed outright.
        wait_for(
            lambda: counter(server, "work", "ember_async_invocations_total", "succeeded") >= 300,
            60,
            "300 invocations done",
        )
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        producer.join(60)
        accepted = [
            json.loads(b)["id"] for s, b in zip(out.statuses, out.bodies, strict=True) if s == 202
        ]
        assert len(accepted) >= 300
        assert all(s == 202 for s in out.statuses)

        server.start()  # the same home (and queue): what was accepted is run
        wait_for(
            lambda: (
                sum(1 for s in statuses(server, "work").values() if s == "succeeded")
                >= len(accepted)
            ),
            120,
            f"{len(accepted)} invocations to succeed",
        )
        ended = statuses(server, "work")
        assert set(accepted) <= set(ended)
        assert {ended[call] for call in accepted} == {"succeeded"}
    finally:
        server.stop(signal.SIGKILL)
        server.http.close()
        server.api.close()


HELD = (
    GATED
    + """
def handle(req, ctx):
    gate(req)
    return "ok"
"""
)
BACKLOG = 100_000


def test_a_backlog_of_100000_holds_up_no_one_else(queue_args: list[str], tmp_path: Path) -> None:
    server = EmberServer(tmp_path / "home", queue_args).start()
    try:
        src = tmp_path / "src"
        manifest = "functions:\n  slow:\n    scale: {max: 3}\n    async: {concurrency: 2}\n"
        server.deploy(make_function(src, "slow", HELD, manifest))
        server.deploy(make_function(src, "other", "def handle(req, ctx):\n    return 'other'\n"))
        with Gate() as gate:
            held = request("POST", f"/fn-async/slow?gate={gate.port}")
            out = produce(server.port, [held] * BACKLOG, 32)
            assert (len(out.statuses), set(out.statuses)) == (BACKLOG, {202})
            gate.wait(2)  # async.concurrency: 2 run, the rest wait

            def depth() -> float:
                return counter(server, "slow", "ember_async_queue_depth")

            wait_for(lambda: depth() == BACKLOG - 2, 10, "the queue depth in /metrics")
            assert counter(server, "slow", "ember_async_oldest_age_seconds") > 0
            # The third instance stays free for synchronous calls of the same function...
            assert server.http.post("/fn/slow").text == "ok"
            # ... other functions answer, synchronously and asynchronously, meanwhile.
            assert server.http.get("/fn/other").text == "other"
            call = server.http.post("/fn-async/other").json()["id"]
            wait_for(
                lambda: (
                    server.api.get(f"/api/v1/invocations/{call}").json()["status"] == "succeeded"
                ),
                10,
                "the other function's async call",
            )
            assert depth() == BACKLOG - 2
            assert gate.held() == 2
            info = server.api.get("/api/v1/functions/slow").json()["instances"]
            assert info["busy"] + info["idle"] + info["starting"] <= 3
            server.cli("rm", "slow")
    finally:
        server.stop(signal.SIGKILL)
        server.http.close()
        server.api.close()


def test_ended_invocations_are_forgotten_after_the_retention(
    queue_args: list[str], tmp_path: Path
) -> None:
    server = EmberServer(tmp_path / "home", ["--async-retention", "1", *queue_args]).start()
    try:
        server.deploy(
            make_function(tmp_path / "src", "brief", "def handle(req, ctx):\n    return 'ok'\n")
        )
        call = server.http.post("/fn-async/brief", headers={"Idempotency-Key": "once"}).json()["id"]
        wait_for(
            lambda: (
                server.api.get(f"/api/v1/invocations/{call}").json().get("status") == "succeeded"
            ),
            10,
            "the invocation to succeed",
        )
        wait_for(
            lambda: server.api.get(f"/api/v1/invocations/{call}").status_code == 404,
            10,
            "the record to be forgotten",
        )
        # ... and its Idempotency-Key with it: the same key queues a new invocation.
        again = server.http.post("/fn-async/brief", headers={"Idempotency-Key": "once"})
        assert again.status_code == 202 and again.json()["id"] != call
    finally:
        server.stop(signal.SIGKILL)
        server.http.close()
        server.api.close()


def test_a_queue_that_cannot_be_opened_stops_the_start_with_its_reason(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = s.getsockname()[1]  # nothing listens there once it is closed
    done = subprocess.run(
        [
            *ember_cmd(),
            "up",
            "--home",
            str(tmp_path / "home"),
            "--port",
            "0",
            "--queue",
            f"nats://127.0.0.1:{nobody}",
        ],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert b"queue of async invocations could not be opened" in done.stderr, done.stderr
    assert b"Traceback" not in done.stderr
