"""Tenant output with no request id — a thread started in an `on_fork` hook, and an `on_fork`
hook itself — floods the server with far more than its log budget: the server's memory stays
bounded, the store keeps at most the budget, every byte is either stored or counted in a
"dropped" notice, and `ember logs` shows the notice."""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from ember.telemetry.buffer import LogBudget
from tests.integration.conftest import EmberServer, wait_for

FLOOD = 160 * 1024 * 1024  # characters each function prints (ASCII: bytes)
# What the server may hold for logs at once: the buffer of one window plus the batch being
# written (and its JSON encoding), for the one function flooding at a time; 32 MiB of slack
# for everything else the server allocates while it serves the floods.
RSS_GROWTH_LIMIT = 3 * LogBudget().function_bytes + 32 * 1024 * 1024

COUNTER = """
import glob, os

def save(n, done):
    tmp = f"/tmp/tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{n} {int(done)}")
    os.replace(tmp, f"/tmp/emitted.{os.getpid()}")

def handle(req, ctx):
    total, done = 0, True
    for path in glob.glob("/tmp/emitted.*"):
        n, finished = open(path).read().split()
        total, done = total + int(n), done and finished == "1"
    return {"emitted": total, "done": done and total > 0}
"""

FLOOD_CODE = """
import sys

def flood():
    chunk = "x" * 65535 + "\\n"
    n = 0
    while n < TARGET:
        sys.stdout.write(chunk)
        n += len(chunk)
        if n % (1 << 22) == 0:
            save(n, False)
    sys.stdout.flush()
    save(n, True)
"""

THREAD_FLOOD = f"""
import threading
import ember
TARGET = {FLOOD}
{COUNTER}
{FLOOD_CODE}

@ember.on_fork
def start():
    threading.Thread(target=flood, daemon=True).start()
"""

HOOK_FLOOD = f"""
import ember
TARGET = {FLOOD}
{COUNTER}
{FLOOD_CODE}
ember.on_fork(flood)
"""

MANIFEST = "functions:\n  {name}:\n    timeout: 5m\n    scale: {{max: 1}}\n"
DROPPED = re.compile(r"\[ember\] (\d+) bytes of output dropped")


@contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Samples the process's RSS every 5 ms on a thread; yields [peak]."""
    proc = psutil.Process(pid)
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def _stored(server: EmberServer, function: str) -> tuple[int, int, list[tuple[float, str]]]:
    """Characters of stdout kept in the store, bytes its notices say were dropped, and the
    notices (ts, message), read from the store's own database."""
    db = sqlite3.connect(f"file:{server.home / 'ember.db'}?mode=ro", uri=True)
    try:
        (kept,) = db.execute(
            "SELECT coalesce(sum(length(message)), 0) FROM logs "
            "WHERE function = ? AND stream = 'stdout'",
            (function,),
        ).fetchone()
        notices = db.execute(
            "SELECT ts, message FROM logs WHERE function = ? AND stream = 'system' "
            "AND message LIKE '[ember] % bytes of output dropped%' ORDER BY id",
            (function,),
        ).fetchall()
    finally:
        db.close()
    dropped = sum(int(m.group(1)) for _, text in notices if (m := DROPPED.match(text)))
    return int(kept), dropped, [(float(ts), str(text)) for ts, text in notices]


def _flood(server: EmberServer, name: str) -> int:
    """Start the function's flood and poll it until it says it printed everything: the
    characters it printed."""
    state: dict[str, object] = {}

    def finished() -> bool:
        resp = server.http.get(f"/fn/{name}")
        assert resp.status_code == 200, resp.text
        state.update(resp.json())
        return bool(state["done"])

    wait_for(finished, 40, f"{name} to print {FLOOD} bytes")
    emitted = state["emitted"]
    assert isinstance(emitted, int) and emitted >= FLOOD
    return emitted


def test_output_without_a_request_id_is_held_to_the_log_budget(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    for name, code in (("thread-flood", THREAD_FLOOD), ("hook-flood", HOOK_FLOOD)):
        server.deploy(fn_dir(name, code, MANIFEST.format(name=name)))
    assert server.proc is not None
    baseline = psutil.Process(server.proc.pid).memory_info().rss
    budget = LogBudget().function_bytes
    for name in ("thread-flood", "hook-flood"):
        qualified = f"default/{name}"
        with peak_rss(server.proc.pid) as peak:
            emitted = _flood(server, name)
            # Every byte is accounted for: kept in the store, or counted in a notice.
            wait_for(
                lambda: sum(_stored(server, qualified)[:2]) == emitted,  # noqa: B023
                15,
                f"the store to account for all {emitted} bytes of {name}",
            )
        growth = peak[0] - baseline
        assert growth < RSS_GROWTH_LIMIT, (
            f"{name}: the server's RSS grew by {growth >> 20} MiB while the function printed "
            f"{emitted >> 20} MiB (limit {RSS_GROWTH_LIMIT >> 20} MiB)"
        )
        kept, dropped, notices = _stored(server, qualified)
        assert notices and dropped > 0, f"{name}: {kept} bytes kept, no dropped notice"
        assert str(budget) in notices[-1][1]  # the notice names the cap
        # `ember logs` shows the notice to the function's owner (the first line from its time).
        shown = server.cli("logs", name, "--since", repr(notices[-1][0]), "--limit", "1")
        assert "bytes of output dropped" in shown.stdout.decode()
    assert server.http.get("/healthz").status_code == 200
