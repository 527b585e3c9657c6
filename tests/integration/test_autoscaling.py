"""The autoscaler, the request queue and the node's memory budget, on a real server."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import GATED, EmberServer, Gate, wait_for

SLEEPY = (
    GATED
    + """
def handle(req, ctx):
    gate(req)
    time.sleep(float(req.query.get("s", "0.3")))
    return {"pid": os.getpid()}
"""
)


def _memory_used(server: EmberServer) -> float:
    """The node's memory budget in use, as /metrics says."""
    for line in server.http.get("/metrics").text.splitlines():
        if line.startswith("ember_memory_used_mb "):
            return float(line.split()[1])
    raise AssertionError("no ember_memory_used_mb in /metrics")


def _info(server: EmberServer, name: str) -> dict[str, Any]:
    data: dict[str, Any] = server.api.get(f"/api/v1/functions/{name}").json()
    return data


def test_load_scales_up_with_panic_then_back_to_zero(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    manifest = """
    functions:
      elastic:
        scale: {max: 20, window: 6s, panic_window: 1s, idle: 2s}
    """
    server.deploy(fn_dir("elastic", SLEEPY, manifest))
    stop = threading.Event()
    seen: list[dict[str, Any]] = []

    def client() -> int:
        failures = 0
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                failures += http.get("/fn/elastic?s=0.2").status_code != 200
        return failures

    def seen_now(done: Callable[[list[dict[str, Any]]], bool]) -> bool:
        seen.append(_info(server, "elastic")["autoscaler"])
        return done(seen)

    with cf.ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(client)]
        try:
            # one client: the scaler provides one instance
            wait_for(lambda: seen_now(lambda s: s[-1]["desired"] == 1), 10, "one instance")
            assert not seen[-1]["panic"], seen[-1]
            seen.clear()
            clients += [pool.submit(client) for _ in range(7)]  # a step to eight
            wait_for(
                lambda: seen_now(
                    lambda s: any(x["panic"] for x in s) and max(x["desired"] for x in s) >= 6
                ),
                20,
                "panic mode and six or more instances wanted",
            )
        except AssertionError as exc:
            said = sorted({(x["desired"], x["panic"]) for x in seen})
            raise AssertionError(f"{exc}; (desired, panic) seen: {said}") from None
        finally:
            stop.set()
        assert sum(c.result() for c in clients) == 0
    # no request for the idle grace (2 s): every instance goes
    wait_for(
        lambda: _info(server, "elastic")["instances"]["idle"] == 0, 10, "scale to zero after idle"
    )
    assert _info(server, "elastic")["autoscaler"]["desired"] == 0


QUEUED = (
    GATED
    + """
def handle(req, ctx):
    print("ran", req.query.get("n"))
    gate(req)
    return "done"
"""
)


def test_a_request_whose_deadline_passes_in_the_queue_never_runs(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    manifest = "functions:\n  single:\n    timeout: 5s\n    scale: {max: 1}\n"
    server.deploy(fn_dir("single", QUEUED, manifest))
    server.http.get("/fn/single?n=warm")  # the instance exists: no start in what follows
    waiting = lambda: _info(server, "single")["instances"]["waiting"]  # noqa: E731

    with Gate() as gate, cf.ThreadPoolExecutor(3) as pool:
        get = server.http.get
        first = pool.submit(get, f"/fn/single?n=0&gate={gate.port}")  # holds the one instance
        gate.wait(1)
        second = pool.submit(get, "/fn/single?n=1")  # waits, then runs
        wait_for(lambda: waiting() == 1, 10, "the second request in the queue")
        metrics = server.http.get("/metrics").text
        queued = [
            line
            for line in metrics.splitlines()
            if line.startswith('ember_waiting_requests{function="single",namespace="default"}')
        ]
        assert queued and float(queued[0].split()[-1]) == 1
        # its deadline passes in the queue, behind the second, while the first holds the instance
        late = get("/fn/single?n=2", headers={"X-Ember-Timeout": "0.5"})
        assert waiting() == 1, "the expired request left the queue"
        gate.open()
        results = [first.result(), second.result()]
    assert [r.status_code for r in results] == [200, 200]
    assert late.status_code == 504
    assert "waiting for a free instance" in late.json()["error"]["message"]
    assert "never ran" in late.json()["error"]["message"]
    bad = server.http.get("/fn/single", headers={"X-Ember-Timeout": "soon"})
    assert bad.status_code == 400 and "X-Ember-Timeout" in bad.json()["error"]["message"]
    rid = late.headers["x-ember-request-id"]

    def flushed() -> bool:
        acts = server.api.get("/api/v1/functions/single/activations").json()["activations"]
        return any(a["id"] == rid for a in acts)

    wait_for(flushed, 5, "the activation records")
    acts = server.api.get("/api/v1/functions/single/activations").json()["activations"]
    record = next(a for a in acts if a["id"] == rid)
    assert record["status"] == 504 and record["instance"] == ""

    def logs() -> str:
        return server.cli("logs", "single").stdout.decode()

    wait_for(lambda: "ran 0" in logs() and "ran 1" in logs(), 5, "the two requests' logs")
    assert "ran 2" not in logs()


def test_memory_budget_counts_what_rests_evicts_it_for_work_then_says_429(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """What rests counts what it uses (a few MB), what works its cap (64 MB here): three
    running instances of alpha fit a 232 MB budget beside beta's idle zygote and instance; a
    fourth evicts beta (instances before zygotes, least recently used first: the order is in
    tests/unit/test_budget.py), is still short, waits --budget-wait and gets 429."""
    server = server_factory("--memory-budget", "232", "--budget-wait", "1")
    for name in ("alpha", "beta"):
        server.deploy(
            fn_dir(name, SLEEPY, f"functions:\n  {name}:\n    memory: 64\n    scale: {{max: 5}}\n")
        )
    assert server.http.get("/fn/alpha?s=0").status_code == 200
    assert server.http.get("/fn/beta?s=0").status_code == 200
    wait_for(lambda: _memory_used(server) <= 40, 10, "what rests to be measured")

    held = "/fn/alpha?s=0&gate="
    with Gate() as gate, cf.ThreadPoolExecutor(4) as pool:
        # alpha's idle instance serves the first; two more start: 3 x 64 MB + what rests
        first = [pool.submit(server.http.get, f"{held}{gate.port}") for _ in range(3)]
        gate.wait(3)
        assert _info(server, "beta")["instances"]["idle"] == 1  # nothing had to go
        assert _info(server, "beta")["zygote"] is True
        pending = pool.submit(server.http.get, "/fn/alpha?s=0")
        # it evicts what of beta rests, is still short, and waits for memory, its start
        # counted within scale.max
        wait_for(lambda: _info(server, "alpha")["instances"]["starting"] == 1, 10, "the wait")
        assert _info(server, "beta")["instances"]["idle"] == 0
        assert _info(server, "beta")["zygote"] is False
        fourth = pending.result()
        assert _info(server, "alpha")["instances"]["starting"] == 0
        gate.open()
        results = [f.result() for f in first]
    assert [r.status_code for r in results] == [200, 200, 200]
    assert fourth.status_code == 429, fourth.text
    error = fourth.json()["error"]
    assert error["code"] == "memory_budget"
    assert "232 MB" in error["message"] and "--memory-budget" in error["message"]
    assert fourth.headers["retry-after"] == "1"
    # with memory back, beta starts again (its zygote too)
    again = server.http.get("/fn/beta?s=0")
    assert again.status_code == 200 and again.headers["x-ember-start"] == "specialize"


def test_a_hot_function_cannot_take_the_scale_min_of_another(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory("--memory-budget", "188", "--budget-wait", "0.5")
    steady = "functions:\n  steady:\n    memory: 64\n    scale: {min: 1}\n"
    server.deploy(fn_dir("steady", SLEEPY, steady))
    wait_for(lambda: _info(server, "steady")["instances"]["idle"] == 1, 10, "steady's min")
    hot = "functions:\n  hot:\n    memory: 64\n    scale: {max: 10}\n"
    server.deploy(fn_dir("hot", SLEEPY, hot))
    # At rest, the zygotes and steady's idle instance count what they use, a few MB each (at
    # their 64 MB cap until measured); each running hot instance counts at its cap: room for
    # two, which the gate holds while the three other requests wait --budget-wait for memory,
    # in vain (a third would need steady's scale.min instance).
    wait_for(lambda: _memory_used(server) <= 60, 10, "what is at rest to be measured")
    with Gate() as gate, cf.ThreadPoolExecutor(5) as pool:
        held = [pool.submit(server.http.get, f"/fn/hot?s=0&gate={gate.port}") for _ in range(5)]
        gate.wait(2)
        wait_for(lambda: sum(f.done() for f in held) == 3, 10, "the three others refused")
        assert gate.held() == 2
        gate.open()
        codes = sorted(f.result().status_code for f in held)
    assert codes == [200, 200, 429, 429, 429], codes
    assert _info(server, "steady")["instances"]["idle"] == 1  # never evicted
    assert server.http.get("/fn/steady?s=0").headers["x-ember-start"] == "warm"


def test_a_callers_short_deadline_ends_only_its_own_request(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    code = """
    import asyncio
    async def handle(req, ctx):  # held until the test opens the gate
        reader, _ = await asyncio.open_connection("127.0.0.1", int(req.query["gate"]))
        await reader.read(1)
        return "done"
    """
    manifest = "functions:\n  shared:\n    concurrency: 4\n    scale: {max: 1}\n"
    server.deploy(fn_dir("shared", code, manifest))
    with Gate() as gate, cf.ThreadPoolExecutor(2) as pool:
        patient = pool.submit(server.http.get, f"/fn/shared?gate={gate.port}")
        gate.wait(1)
        hurried = server.http.get(
            f"/fn/shared?gate={gate.port}", headers={"X-Ember-Timeout": "0.2"}
        )
        assert hurried.status_code == 504
        assert "X-Ember-Timeout" in hurried.json()["error"]["message"]
        assert gate.held() == 2, "both ran in the one instance"
        gate.open()
        assert patient.result().status_code == 200  # same instance, not killed


def test_scale_min_instances_start_again_after_a_restart_without_a_request(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path], tmp_path: Path
) -> None:
    home = tmp_path / "min-home"
    server = server_factory(home=home)
    server.deploy(fn_dir("kept", SLEEPY, "functions:\n  kept:\n    scale: {min: 2}\n"))
    wait_for(lambda: _info(server, "kept")["instances"]["idle"] == 2, 10, "scale.min")
    assert server.stop() == 0
    server = server_factory(home=home)
    wait_for(lambda: _info(server, "kept")["instances"]["idle"] == 2, 10, "scale.min again")
    assert server.http.get("/fn/kept?s=0").headers["x-ember-start"] == "warm"
