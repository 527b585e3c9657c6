"""`/fn/{a}/…` resolves one way only: a namespace's name routes into it, anything else is a
function of `default` (the control plane keeps the two sets of names apart)."""

from __future__ import annotations

import pytest

from ember.gateway.router import RouteTable


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("hello", ("default/hello", "hello", "")),
        ("hello/a/b", ("default/hello", "hello", "a/b")),
        ("team/hello", ("team/hello", "hello", "")),
        ("team/hello/x?y", ("team/hello", "hello", "x?y")),
        ("default/hello/x", ("default/hello", "hello", "x")),
        ("team", ("team/", "", "")),
        ("other/hello", ("default/other", "other", "hello")),
        ("", ("default/", "", "")),
    ],
)
def test_resolve(path: str, expected: tuple[str, str, str]) -> None:
    routes = RouteTable()
    routes.publish({}, frozenset({"team"}))
    assert routes.resolve(path) == expected


def test_default_is_always_a_namespace() -> None:
    routes = RouteTable()
    routes.publish({}, frozenset())
    assert routes.resolve("default/x")[0] == "default/x"
