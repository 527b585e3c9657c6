"""A function zygote reaps its instances: one that exits leaves no zombie behind, and the
next request forks a fresh one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil

from tests.integration.conftest import EmberServer, wait_for

CRASHY = """
import os

def handle(req, ctx):
    if req.query.get("exit"):
        os._exit(3)
    return {"pid": os.getpid()}
"""


def _zombies(server: EmberServer) -> list[psutil.Process]:
    assert server.proc is not None
    out = []
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def test_an_instance_that_exits_is_reaped_and_replaced(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    server = server_factory()
    server.deploy(fn_dir("crashy", CRASHY))
    first = server.http.get("/fn/crashy")
    assert first.status_code == 200
    for _ in range(3):  # each crash is one instance gone
        assert server.http.get("/fn/crashy", params={"exit": "1"}).status_code == 502
        wait_for(lambda: not _zombies(server), 5, "the zygote to reap the instance that exited")
    again = server.http.get("/fn/crashy")
    # A new instance serves: forked for this request, or already by the autoscaler's tick,
    # which may replace a lost instance first (it did once under CI's load).
    assert again.status_code == 200
    assert again.json()["pid"] != first.json()["pid"]
