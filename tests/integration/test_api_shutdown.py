"""Stopping the server while the control plane has work scheduled for later."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import EmberServer

CODE = "def handle(req, ctx):\n    return 'ok'\n"


def test_a_stop_with_a_clean_up_pending_leaves_no_warning(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
) -> None:
    """`ember rm` drops the function's code only after its requests' timeout; a SIGTERM before
    then cancels that clean-up without `coroutine ... was never awaited` on stderr."""
    server = server_factory()
    server.deploy(fn_dir("gone", CODE))
    assert server.http.get("/fn/gone").text == "ok"
    server.cli("rm", "gone")
    assert server.stop(signal.SIGTERM) == 0, server.output()
    output = server.output()
    assert "was never awaited" not in output, output
    assert "RuntimeWarning" not in output, output
    assert "Traceback" not in output, output
