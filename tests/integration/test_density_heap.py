"""The server freezes what it holds per function out of the garbage collector's way after each
publish (server/heap.py), and what it froze stays bounded through a deploy/rm loop: frozen
objects are never collected, so without the bound every removed function would stay."""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import pairwise

from ember.server import heap
from tests.integration.conftest import EmberServer, one_file_bundle, wait_for

CODE = b"def handle(req, ctx):\n    return {'n': 1}\n"
CHURN = 500


def _value(server: EmberServer, name: str) -> float:
    text = server.http.get("/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} missing from /metrics"
    return float(found.group(1))


def _frozen(server: EmberServer) -> float:
    return _value(server, "ember_gc_frozen_objects")


def test_what_a_deploy_builds_is_frozen_and_a_deploy_rm_loop_keeps_it_bounded(
    server_factory: Callable[..., EmberServer],
) -> None:
    server = server_factory()
    bundle = one_file_bundle(CODE)
    at_start = _frozen(server)
    full_at_start = _value(server, "ember_gc_full_collections_total")
    deployed = server.api.post("/api/v1/deploy", params={"name": "keep"}, content=bundle)
    assert deployed.status_code == 201, deployed.text
    assert server.http.get("/fn/keep").json() == {"n": 1}
    # a moment after the publish, what the deploy built is frozen
    wait_for(lambda: _frozen(server) > at_start, 10, "the deploy's objects to be frozen")
    frozen: list[float] = []
    for i in range(CHURN):
        name = f"churn-{i}"
        deployed = server.api.post("/api/v1/deploy", params={"name": name}, content=bundle)
        assert deployed.status_code == 201, deployed.text
        assert server.http.get(f"/fn/{name}").json() == {"n": 1}
        assert server.api.delete(f"/api/v1/functions/{name}").status_code == 200
        if i % 20 == 0:
            frozen.append(_frozen(server))
    # Each function froze ~170 objects that its removal left as garbage among the frozen
    # ones (~85,000 here in all); a full collection took them back each time they numbered
    # GROWTH of the live heap. The live heap grows a little meanwhile: removed functions'
    # code is dropped only after a grace, and a few caches fill.
    assert _value(server, "ember_gc_full_collections_total") > full_at_start
    assert any(b < a for a, b in pairwise(frozen)), frozen  # taken back
    assert max(frozen) <= (1 + heap.GROWTH) * at_start * 1.3, (frozen, at_start)
    assert 'ember_gc_pause_seconds_count{generation="2"}' in server.http.get("/metrics").text
