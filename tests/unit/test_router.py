"""`/fn/{a}/…` resolves one way only: a namespace's name routes into it, anything else is a
function of `default` (the control plane keeps the two sets of names apart). A weighted
route splits requests by a hash of their id: sticky, and within 2 % of its weights."""

from __future__ import annotations

import os

import pytest

from ember.gateway.router import Route, RouteTable, split_of
from ember.pool.target import Target
from ember.spec import FunctionSpec


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("hello", ("default/hello", "hello", "", "")),
        ("hello/a/b", ("default/hello", "hello", "", "a/b")),
        ("team/hello", ("team/hello", "hello", "", "")),
        ("team/hello/x?y", ("team/hello", "hello", "", "x?y")),
        ("default/hello/x", ("default/hello", "hello", "", "x")),
        ("team", ("team/", "", "", "")),
        ("other/hello", ("default/other", "other", "", "hello")),
        ("", ("default/", "", "", "")),
        ("hello@canary", ("default/hello", "hello", "canary", "")),
        ("hello@canary/x", ("default/hello", "hello", "canary", "x")),
        ("team/hello@stable/x", ("team/hello", "hello", "stable", "x")),
    ],
)
def test_resolve(path: str, expected: tuple[str, str, str, str]) -> None:
    routes = RouteTable()
    routes.publish({}, frozenset({"team"}))
    assert routes.resolve(path) == expected


def test_default_is_always_a_namespace() -> None:
    routes = RouteTable()
    routes.publish({}, frozenset())
    assert routes.resolve("default/x")[0] == "default/x"


def _target(number: int) -> Target:
    return Target(
        function="f", number=number, sha256=f"{number}" * 64, code_dir="/", spec=FunctionSpec("f")
    )


def _route(weights: dict[str, tuple[int, int]]) -> Route:
    aliases = {name: _target(rev) for name, (rev, _w) in weights.items()}
    split = split_of([(name, w) for name, (_rev, w) in weights.items()])
    return Route(main=_target(1), aliases=aliases, split=split)


def test_split_of_takes_cumulative_bounds_and_skips_zero_weights() -> None:
    assert split_of([("a", 90), ("b", 0), ("c", 10)]) == ((90, "a"), (100, "c"))
    assert split_of([]) == ()


@pytest.mark.parametrize("weights", [(90, 10), (50, 50), (99, 1), (70, 20)])
def test_a_weighted_split_of_10000_requests_is_within_2_percent(
    weights: tuple[int, int],
) -> None:
    stable, canary = weights
    other = 100 - stable - canary
    table = {"stable": (3, stable), "canary": (4, canary)}
    if other:
        table["third"] = (5, other)
    route = _route(table)
    counts: dict[str, int] = {}
    for _ in range(10_000):
        alias = route.pick(os.urandom(16).hex().encode())[1]
        counts[alias] = counts.get(alias, 0) + 1
    for alias, (_rev, weight) in table.items():
        assert abs(counts.get(alias, 0) / 10_000 - weight / 100) <= 0.02, counts


def test_sequential_caller_ids_split_as_well() -> None:
    route = _route({"stable": (3, 90), "canary": (4, 10)})
    canary = sum(route.pick(f"req-{i}".encode())[1] == "canary" for i in range(10_000))
    assert abs(canary / 10_000 - 0.10) <= 0.02


def test_routing_is_sticky_per_request_id() -> None:
    route = _route({"stable": (3, 50), "canary": (4, 50)})
    for i in range(200):
        rid = f"order-{i}".encode()
        first = route.pick(rid)
        assert all(route.pick(rid) == first for _ in range(5))


def test_no_split_serves_the_main_revision() -> None:
    route = Route(main=_target(7), aliases={"stable": _target(3)})
    assert route.pick(b"x") == (_target(7), "")
