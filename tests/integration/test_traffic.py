"""Revisions, aliases, weighted traffic, rollback and gradual rollouts on a real server."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import EmberServer, Gate, wait_for

VERSIONED = """
import socket, time
VERSION = {version!r}
def handle(req, ctx):
    if "gate" in req.query:  # held until the test opens the gate
        with socket.create_connection(("127.0.0.1", int(req.query["gate"]))) as sock:
            sock.recv(1)
    delay = float(req.query.get("sleep", "0"))
    if delay:
        time.sleep(delay)
    if VERSION == "bad":
        raise RuntimeError("this revision is broken")
    return {{"version": VERSION}}
"""


def deploy_version(
    server: EmberServer,
    fn_dir: Callable[..., Path],
    version: str,
    *args: str,
    name: str = "svc",
    manifest: str = "",
) -> None:
    text = manifest or f"functions:\n  {name}:\n    scale: {{max: 20}}\n"
    server.deploy(fn_dir(name, VERSIONED.format(version=version), text), *args)


def detail(server: EmberServer, name: str = "svc") -> dict[str, Any]:
    data: dict[str, Any] = server.api.get(f"/api/v1/functions/{name}").json()
    return data


def test_revisions_list_config_diffs_and_old_ones_are_collected(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory("--revision-retention", "3")
    deploy_version(server, fn_dir, "v1")
    deploy_version(
        server, fn_dir, "v1", manifest="functions:\n  svc:\n    memory: 256\n    scale: {max: 20}\n"
    )
    deploy_version(server, fn_dir, "v3")
    early = server.api.get("/api/v1/functions/svc/revisions").json()["revisions"]
    assert [r["changes"] for r in early] == [
        ["first revision"],
        ["memory: 128 -> 256"],
        ["code", "memory: 256 -> 128"],
    ]
    server.cli("traffic", "svc", "pinned=1")  # an alias keeps revision 1 past the retention
    deploy_version(server, fn_dir, "v4")
    deploy_version(server, fn_dir, "v5")
    revs = server.api.get("/api/v1/functions/svc/revisions").json()["revisions"]
    assert [r["number"] for r in revs] == [1, 3, 4, 5]  # 2 went: older than the newest three
    by_number = {r["number"]: r for r in revs}
    assert by_number[1]["changes"] == ["first revision"] and by_number[1]["aliases"] == ["pinned"]
    assert by_number[3]["changes"] == ["code"]  # against 1 now: 2 is gone
    assert by_number[5]["serving"] and by_number[5]["aliases"] == ["latest"]
    out = server.cli("revisions", "svc").stdout.decode()
    assert "first revision" in out and "pinned" in out and "serving" in out
    # the pinned revision still answers, directly
    old = server.http.get("/fn/svc@pinned")
    assert old.json() == {"version": "v1"} and old.headers["x-ember-revision"] == "1"
    assert old.headers["x-ember-alias"] == "pinned"
    # code of removed revisions is gone when no other revision uses it
    bundles = {p.name for p in (server.home / "code").iterdir() if not p.name.startswith(".")}
    assert len(bundles) == 4


def test_weighted_traffic_splits_10000_requests_within_2_percent_and_sticks(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    deploy_version(server, fn_dir, "v1")
    deploy_version(server, fn_dir, "v2")
    out = server.cli("traffic", "svc", "stable=1:90", "canary=2:10").stdout.decode()
    assert "stable=1:90%" in out and "canary=2:10%" in out
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def worker(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for _ in range(n):
                resp = http.get("/fn/svc")
                assert resp.status_code == 200
                key = f"{resp.headers['x-ember-alias']}:{resp.headers['x-ember-revision']}"
                assert resp.json()["version"] == f"v{resp.headers['x-ember-revision']}"
                with lock:
                    counts[key] = counts.get(key, 0) + 1

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, [1250] * 8))
    assert sum(counts.values()) == 10_000
    assert set(counts) == {"stable:1", "canary:2"}
    assert abs(counts["canary:2"] / 10_000 - 0.10) <= 0.02, counts
    # the same X-Request-Id always lands on the same revision
    for i in range(20):
        seen = {
            server.http.get("/fn/svc", headers={"X-Request-Id": f"order-{i}"}).headers[
                "x-ember-revision"
            ]
            for _ in range(5)
        }
        assert len(seen) == 1
    # an alias is reachable directly, whatever its weight; unknown aliases are a clear 404
    assert server.http.get("/fn/svc@canary").json() == {"version": "v2"}
    assert server.http.get("/fn/svc@latest").headers["x-ember-revision"] == "2"
    missing = server.http.get("/fn/svc@nope")
    assert missing.status_code == 404 and "no alias 'nope'" in missing.json()["error"]["message"]
    for bad, _status in [
        (["a=1:50", "b=2:20"], 400),
        (["a=9:100"], 422),
        (["latest=1:100"], 400),
        (["a=1:100", "a=2:0"], 400),
    ]:
        done = server.cli("traffic", "svc", *bad, check=False)
        assert done.returncode != 0, bad
    resp = server.api.put(
        "/api/v1/functions/svc/traffic", json={"aliases": [{"name": "x", "revision": 1}] * 2}
    )
    assert resp.status_code == 400
    # nothing changed by the refused calls
    weights = {a["name"]: a["weight"] for a in detail(server)["traffic"]["aliases"]}
    assert weights == {"stable": 90, "canary": 10}


def test_load_sees_no_failure_through_deploy_traffic_rollback_and_scale(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    deploy_version(server, fn_dir, "v1")
    stop = threading.Event()
    failures: list[str] = []
    versions: set[str] = set()
    answered = [0]  # by the clients, all together

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                resp = http.get("/fn/svc?sleep=0.005")
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code} {resp.text[:200]}")
                else:
                    versions.add(resp.json()["version"])
                answered[0] += 1

    def under_load() -> None:  # each change happens while requests keep coming
        mark = answered[0]
        wait_for(lambda: answered[0] >= mark + 30, 30, "30 more requests answered")

    with Gate() as gate, cf.ThreadPoolExecutor(8) as pool:
        slow = pool.submit(server.http.get, f"/fn/svc?gate={gate.port}")
        gate.wait(1)  # in flight on revision 1 until the end
        clients = [pool.submit(client) for _ in range(6)]
        try:
            for change in (
                lambda: deploy_version(server, fn_dir, "v2"),  # revision 1 is retired
                lambda: server.cli("traffic", "svc", "stable=1:50", "canary=2:50"),
                lambda: server.cli("scale", "svc", "--instances", "6"),
                lambda: server.cli("rollback", "svc", "--to", "1"),
                lambda: server.cli("rollback", "svc"),  # back to the one before: 2
                lambda: server.cli("scale", "svc", "--instances", "0"),
            ):
                under_load()
                change()
            under_load()
        finally:
            stop.set()
        for c in clients:
            c.result()
        gate.open()
        old = slow.result()
    assert failures == [], failures[:5]
    assert versions == {"v1", "v2"}
    assert old.status_code == 200 and old.json() == {"version": "v1"}
    assert detail(server)["traffic"]["serving"] == 2


def test_rollback_goes_back_in_one_step(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    deploy_version(server, fn_dir, "v1")
    deploy_version(server, fn_dir, "v2")
    out = server.cli("rollback", "svc").stdout.decode()
    assert "all to revision 1" in out
    assert all(server.http.get("/fn/svc").json() == {"version": "v1"} for _ in range(20))
    server.cli("rollback", "svc", "--to", "2")
    assert server.http.get("/fn/svc").json() == {"version": "v2"}
    bad = server.cli("rollback", "svc", "--to", "7", check=False)
    assert bad.returncode != 0 and b"no revision 7" in bad.stderr
    lone = "functions:\n  lone:\n    scale: {max: 2}\n"
    deploy_version(server, fn_dir, "v1", name="lone", manifest=lone)
    none = server.cli("rollback", "lone", check=False)
    assert none.returncode != 0 and b"no earlier revision" in none.stderr


def _rollout(server: EmberServer) -> dict[str, Any]:
    rollout: dict[str, Any] = detail(server)["traffic"]["rollout"]
    return rollout


def test_a_canary_that_fails_is_rolled_back_automatically(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    deploy_version(server, fn_dir, "v1")
    deploy_version(
        server,
        fn_dir,
        "bad",
        "--canary",
        "30",
        "--step",
        "30",
        "--every",
        "30s",
        "--max-error-rate",
        "5%",
    )
    assert _rollout(server)["state"] == "running"
    weights = {
        a["name"]: (a["revision"], a["weight"]) for a in detail(server)["traffic"]["aliases"]
    }
    assert weights == {"stable": (1, 70), "canary": (2, 30)}
    statuses = [server.http.get("/fn/svc").status_code for _ in range(100)]
    assert 500 in statuses and 200 in statuses  # the canary serves its share, badly
    # rolled back on the next check (every second), long before the 30 s step ends
    wait_for(lambda: _rollout(server)["state"] == "rolled_back", 5, "the automatic rollback")
    rollout = _rollout(server)
    assert "error rate" in rollout["reason"] and "rolled back to 1" in rollout["reason"]
    assert rollout["errors"] >= 10
    assert all(server.http.get("/fn/svc").json() == {"version": "v1"} for _ in range(50))
    described = server.cli("describe", "svc").stdout.decode()
    assert "rolled_back" in described and "error rate" in described


def test_a_good_canary_steps_to_all_and_the_rollout_survives_a_restart(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path], tmp_path: Path
) -> None:
    home = tmp_path / "rollout-home"
    server = server_factory(home=home)
    deploy_version(server, fn_dir, "v1")
    deploy_version(server, fn_dir, "v2", "--canary", "20", "--step", "40", "--every", "2s")
    assert _rollout(server)["weight"] == 20
    assert server.stop() == 0
    server = server_factory(home=home)  # same state directory
    rollout = _rollout(server)
    assert rollout["state"] == "running" and rollout["to_revision"] == 2
    seen: list[int] = []

    def progressed() -> bool:
        for _ in range(20):
            assert server.http.get("/fn/svc").status_code == 200
        state = _rollout(server)
        seen.append(state["weight"])
        return bool(state["state"] == "done")

    wait_for(progressed, 15, "the rollout to finish")
    assert 60 in seen  # 20 -> 60 -> 100
    traffic = detail(server)["traffic"]
    assert traffic["serving"] == 2 and traffic["previous"] == 1
    assert all(a["weight"] == 0 for a in traffic["aliases"])
    assert all(server.http.get("/fn/svc").json() == {"version": "v2"} for _ in range(20))
    server.stop(signal.SIGTERM)


def test_bad_rollout_options_and_canary_of_a_new_function_are_refused(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    first = server.cli(
        "deploy",
        str(fn_dir("svc", VERSIONED.format(version="v1"))),
        "--canary",
        "10",
        check=False,
    )
    assert first.returncode != 0 and b"nothing to compare" in first.stderr
    assert server.api.get("/api/v1/functions/svc").status_code == 404
    deploy_version(server, fn_dir, "v1")
    rate = server.cli(
        "deploy",
        str(fn_dir("svc", VERSIONED.format(version="v2"))),
        "--canary",
        "10",
        "--max-error-rate",
        "lots",
        check=False,
    )
    assert rate.returncode != 0 and b"--max-error-rate" in rate.stderr
    raw = server.api.post("/api/v1/deploy?canary=150", content=b"x")
    assert raw.status_code == 400 and "canary" in json.loads(raw.text)["error"]["message"]
    assert [
        r["number"] for r in server.api.get("/api/v1/functions/svc/revisions").json()["revisions"]
    ] == [1]


def test_an_alias_of_an_older_public_revision_does_not_open_a_private_function(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    deploy_version(server, fn_dir, "v1")
    server.cli("traffic", "svc", "old=1")
    private = "functions:\n  svc:\n    access: private\n    scale: {max: 20}\n"
    deploy_version(server, fn_dir, "v2", manifest=private)
    for path in ("/fn/svc", "/fn/svc@old", "/fn/svc@latest"):
        assert server.http.get(path).status_code == 401, path
    unknown = server.http.get("/fn/svc@nope")
    assert unknown.status_code == 404 and "old" not in unknown.json()["error"]["message"]
    key = server.api.headers["Authorization"]
    assert server.http.get("/fn/svc@old", headers={"Authorization": key}).json() == {
        "version": "v1"
    }


def test_a_deploy_keeps_its_warmed_zygote_though_the_function_was_idle(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory("--zygote-keepalive", "2")
    quick = "functions:\n  svc:\n    scale: {max: 20, idle: 0.5s}\n"
    deploy_version(server, fn_dir, "v1", manifest=quick)
    witness = "functions:\n  witness:\n    scale: {idle: 0.1s}\n"
    deploy_version(server, fn_dir, "w", name="witness", manifest=witness)
    assert server.http.get("/fn/svc").status_code == 200
    wait_for(lambda: detail(server)["zygote"] is False, 10, "the idle zygote to be released")
    deploy_version(server, fn_dir, "v2", manifest=quick)
    # Keep-alive steps run after the deploy: the witness's instance goes at one, past its idle
    # grace. The probed zygote stays through them (2 s from the deploy).
    assert server.http.get("/fn/witness").status_code == 200
    wait_for(lambda: detail(server, "witness")["instances"]["idle"] == 0, 10, "a step")
    assert detail(server)["zygote"] is True
    assert server.http.get("/fn/svc").headers["x-ember-start"] == "fork"
