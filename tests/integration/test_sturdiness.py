"""Regression tests for the sturdiness review (issue 8): each against a real `ember up`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import EmberServer, wait_for

HELLO = """
def handle(req, ctx):
    return {"ok": True}
"""


def test_scale_to_zero_holds_while_the_window_remembers_load(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """`ember scale --instances 0` holds 0 for scale.idle (60 s by default): the autoscaler
    must not bring an instance back because its stable window still remembers the load."""
    server = server_factory()
    server.deploy(fn_dir("held", HELLO))
    info = lambda: server.api.get("/api/v1/functions/held").json()  # noqa: E731
    for _ in range(20):
        assert server.http.get("/fn/held").status_code == 200
    wait_for(lambda: info()["autoscaler"]["desired"] >= 1, 5, "the autoscaler to see the load")
    server.cli("scale", "held", "--instances", "0")
    held = lambda: info()["autoscaler"]["desired"] == 0 and info()["instances"]["idle"] == 0  # noqa: E731
    wait_for(held, 5, "the autoscaler to hold 0 instances")
    resp = server.http.get("/fn/held")  # a request still starts what it needs
    assert resp.headers["x-ember-start"] == "fork"
    wait_for(held, 5, "the hold to stop the request's instance again once idle")
