"""How a zygote forks its instances (`ember.runtime.forking`): without CPython's after-fork work
when the function's code leaves nothing for it to do, with `os.fork()` when it does. Either way
each instance draws its own random numbers and the function's own at-fork hooks run."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from tests.integration.conftest import EmberServer, named, wait_for

DICE = """
import os, random, time

def handle(req, ctx):
    time.sleep(0.5)  # both requests in flight at once: one on each instance
    return {"pid": os.getpid(), "draw": random.getrandbits(64)}
"""

HOOKED = """
import os

FORKED = []
os.register_at_fork(after_in_child=lambda: FORKED.append(os.getpid()))

def handle(req, ctx):
    return {"pid": os.getpid(), "forked": FORKED}
"""

THREADED = """
import threading, time

threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()

def handle(req, ctx):
    return {"threads": threading.active_count()}
"""

# Named at import (PR_SET_NAME), so the test finds the zygote and its instance.
NAMED = """
import ctypes, os
ctypes.CDLL(None).prctl(15, b"ember-{name}", 0, 0, 0)
{extra}
def handle(req, ctx):
    return {{"pid": os.getpid()}}
"""


def test_instances_of_one_zygote_draw_different_random_numbers(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    server.deploy(fn_dir("dice", DICE, "functions:\n  dice:\n    scale: {min: 2}\n"))
    with ThreadPoolExecutor(2) as pool:
        got = [r.json() for r in pool.map(lambda _: server.http.get("/fn/dice"), range(2))]
    assert got[0]["pid"] != got[1]["pid"], "two instances answered"
    assert got[0]["draw"] != got[1]["draw"]


def test_an_at_fork_hook_of_the_function_runs_in_each_instance(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    server.deploy(fn_dir("hooked", HOOKED))
    got = server.http.get("/fn/hooked").json()
    assert got["forked"] == [got["pid"]]


def test_a_function_whose_import_started_a_thread_forks_with_os_fork(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """os.fork() lets `threading` forget the threads that did not come along."""
    server = server_factory()
    server.deploy(fn_dir("threaded", THREADED))
    assert server.http.get("/fn/threaded").json() == {"threads": 1}


def _instance_uss(name: str) -> float:
    """USS in MB of the one instance of the function that named itself `ember-NAME`."""
    found: list[psutil.Process] = []

    def one_instance() -> bool:
        procs = named(f"ember-{name}")
        pids = {p.pid for p in procs}
        found[:] = [p for p in procs if p.ppid() in pids]
        return len(found) == 1

    wait_for(one_instance, 10, f"the instance of {name}")
    return float(found[0].memory_full_info().uss) / (1024 * 1024)


def test_a_plain_fork_leaves_the_instance_less_private_memory(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """The same function twice, one with an at-fork hook (so forked by os.fork()): CPython's
    after-fork work writes ~0.2 MB of pages in each instance that a plain fork leaves shared."""
    server = server_factory()
    hook = "os.register_at_fork(after_in_child=lambda: None)"
    for name, extra in (("plainfork", ""), ("osfork", hook)):
        server.deploy(fn_dir(name, NAMED.format(name=name, extra=extra)))
        assert server.http.get(f"/fn/{name}").status_code == 200
    plain, os_fork = _instance_uss("plainfork"), _instance_uss("osfork")
    assert plain + 0.1 < os_fork, (plain, os_fork)
