"""The spare instance: a start from zero after idleness is a hand-off, not a fork.

When the autoscaler takes a revision back to its floor, its zygote forks one instance ahead of
need (its `on_fork` hooks run, placed in its own memory cgroup); the next start takes it and
says so (`X-Ember-Start: spare`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.integration.conftest import EmberServer, named, wait_for

CODE = """
import ctypes, time
import ember

ctypes.CDLL(None).prctl(15, b"ember-handoff", 0, 0, 0)  # PR_SET_NAME: how the test finds it
HOOKED = []


@ember.on_fork
def _hook():
    HOOKED.append(time.monotonic())  # CLOCK_MONOTONIC: the test's clock too


def handle(req, ctx):
    return {"hooked": HOOKED[-1]}
"""
MANIFEST = "functions:\n  handoff:\n    scale: {idle: 300ms}\n"


def _zygote_and_spare() -> tuple[psutil.Process, psutil.Process] | None:
    """The function's zygote and its only child, when it has exactly one."""
    procs = named("ember-handoff")
    pids = {p.pid for p in procs}
    zygotes = [p for p in procs if p.ppid() not in pids]
    children = [p for p in procs if p.ppid() in pids]
    if len(zygotes) == 1 and len(children) == 1:
        return zygotes[0], children[0]
    return None


def _memory_cgroup(proc: psutil.Process) -> str:
    with open(f"/proc/{proc.pid}/cgroup") as f:
        lines = f.read().splitlines()
    paths = [line.split(":", 2)[2] for line in lines if line.split(":")[1] in ("memory", "")]
    return paths[0] if paths else ""


def test_a_start_from_zero_takes_the_spare_whose_hooks_already_ran(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    server.deploy(fn_dir("handoff", CODE, MANIFEST))
    info = lambda: server.api.get("/api/v1/functions/handoff").json()  # noqa: E731
    assert server.http.get("/fn/handoff").headers["x-ember-start"] == "fork"
    for _ in range(2):  # each time the autoscaler takes it to zero, a spare stands in
        wait_for(lambda: info()["instances"]["idle"] == 0, 10, "the idle instance to be reaped")
        wait_for(lambda: _zygote_and_spare() is not None, 10, "the spare instance")
        found = _zygote_and_spare()
        assert found is not None
        _zygote, spare = found
        # Placed in a memory cgroup of its own, named like any instance of the revision.
        wait_for(lambda: "/handoff-1-" in _memory_cgroup(spare), 10, "the spare's cgroup")  # noqa: B023
        sent = time.monotonic()
        resp = server.http.get("/fn/handoff")
        assert resp.status_code == 200 and resp.headers["x-ember-start"] == "spare"
        assert resp.json()["hooked"] < sent  # its on_fork hooks ran before the request came
        assert spare.is_running()  # the spare itself serves now
        assert server.http.get("/fn/handoff").headers["x-ember-start"] == "warm"
    # `ember scale -n 0` frees the instances and the spare; the zygote stays.
    wait_for(lambda: _zygote_and_spare() is not None, 10, "the spare instance")
    server.cli("scale", "handoff", "--instances", "0")
    wait_for(lambda: len(named("ember-handoff")) == 1, 10, "only the zygote")
    assert server.http.get("/fn/handoff").headers["x-ember-start"] == "fork"


def test_a_spare_that_died_before_its_first_request_is_never_handed_over(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    server.deploy(fn_dir("handoff", CODE, MANIFEST))
    info = lambda: server.api.get("/api/v1/functions/handoff").json()  # noqa: E731
    assert server.http.get("/fn/handoff").status_code == 200
    wait_for(lambda: info()["instances"]["idle"] == 0, 10, "the idle instance to be reaped")
    wait_for(lambda: _zygote_and_spare() is not None, 10, "the spare instance")
    found = _zygote_and_spare()
    assert found is not None
    found[1].kill()
    found[1].wait(5)
    wait_for(lambda: len(named("ember-handoff")) == 1, 10, "the spare gone")
    resp = server.http.get("/fn/handoff")  # a fork (or a new spare, made after a back-off)
    assert resp.status_code == 200 and resp.headers["x-ember-start"] in ("fork", "spare")
    assert resp.json()["hooked"] > 0
