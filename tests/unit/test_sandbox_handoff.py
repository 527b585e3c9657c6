"""The sandbox's first step without a keeper left behind: the process that forks the zygote
into its pid namespace places it, reports and exits; the zygote becomes the child of the
root-like process above (a child subreaper) and dies with it, even when that one dies while
the zygote is being handed over.

Real processes, as root: a stand-in for the root zygote (`_root`), forked by the test, forks
the keeper, which calls `sandbox.split` as a zygote-to-be does.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest

from ember.runtime import limits, lineage, sandbox
from tests.integration.conftest import wait_for


def current_lineage() -> lineage.Lineage | None:
    return lineage.current


@pytest.fixture(scope="module", autouse=True)
def _privileged() -> None:
    if sandbox.privileged():
        return
    why = "a pid namespace needs CAP_SYS_ADMIN"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {why}", pytrace=False)
    pytest.skip(why)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _zygote(go_r: int, out_w: int) -> None:
    """In the zygote: say who we are, wait for the test, then finish the hand-off."""
    mine = current_lineage()
    assert mine is not None
    me = int(os.readlink("/proc/self"))  # the host's /proc: our pid outside the namespace
    os.write(out_w, json.dumps({"pid": me, "keeper": mine.keeper}).encode() + b"\n")
    os.read(go_r, 1)
    try:
        sandbox.placed(READY[0])
    except sandbox.SandboxError as exc:
        os.write(out_w, json.dumps({"error": str(exc)}).encode() + b"\n")
        return
    os.write(out_w, json.dumps({"adopted": mine.parent()}).encode() + b"\n")
    signal.pause()  # until the root-like process dies: then SIGKILL


READY = [-1]


def _keeper(go_r: int, out_w: int) -> None:
    limits.die_with_parent(os.getppid())  # as a zygote-to-be does in its prologue
    READY[0] = sandbox.split([])  # the keeper exits in here; the zygote returns
    _zygote(go_r, out_w)


@contextmanager
def _family() -> Iterator[tuple[int, int, Any]]:
    """(root-like pid, the write end that lets the zygote go on, its reports)."""
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    root = os.fork()
    if root == 0:  # pragma: no cover - runs in the child
        try:
            os.close(go_w)
            os.close(out_r)
            limits.become_subreaper()
            if os.fork() == 0:
                _keeper(go_r, out_w)
                os._exit(0)
            while True:  # reap the keeper and, once adopted, the zygote
                try:
                    os.wait()
                except ChildProcessError:
                    signal.pause()
        finally:
            os._exit(1)
    os.close(go_r)
    os.close(out_w)
    reports = os.fdopen(out_r, "rb")
    try:
        yield root, go_w, reports
    finally:
        os.close(go_w)
        reports.close()
        try:
            os.kill(root, signal.SIGKILL)
            os.waitpid(root, 0)
        except (ProcessLookupError, ChildProcessError):
            pass  # the test ended it already


def _report(reports: Any) -> dict[str, Any]:
    line = reports.readline()
    assert line, "the zygote ended without a report"
    got: dict[str, Any] = json.loads(line)
    if "pid" in got:
        STARTED.append(got["pid"])
    return got


STARTED: list[int] = []  # zygotes the tests started: none may outlive them, even when one fails


@pytest.fixture(autouse=True)
def _no_survivor() -> Iterator[None]:
    yield
    while STARTED:
        try:
            os.kill(STARTED.pop(), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_keeper_exits_and_the_zygote_is_the_root_zygotes_child_and_dies_with_it() -> None:
    with _family() as (root, go, reports):
        hello = _report(reports)
        zygote, keeper = hello["pid"], hello["keeper"]
        os.write(go, b"x")
        assert _report(reports) == {"adopted": root}
        assert psutil.Process(zygote).ppid() == root
        wait_for(lambda: _gone(keeper), 10, "the keeper to exit")
        os.kill(root, signal.SIGKILL)
        wait_for(lambda: _gone(zygote), 10, "the zygote to die with the root-like process")


def test_a_root_zygote_that_dies_during_the_hand_off_takes_the_zygote_with_it() -> None:
    """The root dies after the keeper exited and before the zygote re-armed its death signal:
    the zygote, now a child of init, must see it and give up, not live on unsupervised."""
    with _family() as (root, go, reports):
        hello = _report(reports)
        zygote, keeper = hello["pid"], hello["keeper"]
        wait_for(lambda: _gone(keeper), 10, "the keeper to exit")
        os.kill(root, signal.SIGKILL)
        os.waitpid(root, 0)
        assert not _gone(zygote), "the zygote died before it was told of it"
        os.write(go, b"x")
        report = _report(reports)
        assert "root zygote exited" in report.get("error", ""), report
        wait_for(lambda: _gone(zygote), 10, "the zygote to exit")
