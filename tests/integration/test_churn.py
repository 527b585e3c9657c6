"""A deploy/rm loop leaves nothing behind: the server's per-function state, its /metrics and
its memory return to where they were (issue 8: state outlived `ember rm`)."""

from __future__ import annotations

import re
from collections.abc import Callable

import psutil

from tests.integration.conftest import EmberServer, one_file_bundle, wait_for

CODE = b"def handle(req, ctx):\n    return {'n': 1}\n"
CHURN = 500
RSS_GROWTH_MB = 40  # the leak this guards against grew the server without bound


def _gauge(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} missing from /metrics"
    return float(found.group(1))


def _without_gc(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("ember_gc_"))


def _settled(server: EmberServer) -> str:
    """/metrics once nothing of removed functions is held any more (polled, 60 s at most)."""
    held = ("ember_pool_revisions", "ember_pool_functions_tracked", "ember_cgroups_pending")
    last = [""]

    def done() -> bool:
        last[0] = server.http.get("/metrics").text
        return all(_gauge(last[0], g) == 0 for g in held)

    wait_for(done, 60, "the pool to let go of every removed function")
    return last[0]


def _churn(server: EmberServer, names: range, bundle: bytes) -> None:
    for i in names:
        name = f"churn-{i}"
        deployed = server.api.post("/api/v1/deploy", params={"name": name}, content=bundle)
        assert deployed.status_code == 201, deployed.text
        assert server.http.get(f"/fn/{name}").json() == {"n": 1}
        assert server.api.delete(f"/api/v1/functions/{name}").status_code == 200


def test_deploying_and_removing_500_functions_leaves_nothing_behind(
    server_factory: Callable[..., EmberServer],
) -> None:
    server = server_factory()
    assert server.proc is not None
    bundle = one_file_bundle(CODE)
    _churn(server, range(20), bundle)  # imports, caches and pools of the server warm up
    before = _settled(server)
    rss_before = psutil.Process(server.proc.pid).memory_info().rss
    _churn(server, range(20, 20 + CHURN), bundle)
    after = _settled(server)
    assert "churn-" not in after  # no series of a removed function
    # the garbage collector's counts and pauses change, not the number of series
    assert len(_without_gc(after)) == len(_without_gc(before)), (len(before), len(after))
    growth = (psutil.Process(server.proc.pid).memory_info().rss - rss_before) / 2**20
    assert growth < RSS_GROWTH_MB, f"the server grew {growth:.1f} MB over {CHURN} deploy/rm"
