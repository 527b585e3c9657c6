"""The route table: function name → the revision that serves it. Swapped whole, never edited."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ember.pool.target import Target


class RouteTable:
    def __init__(self) -> None:
        self._routes: Mapping[str, Target] = MappingProxyType({})

    def get(self, name: str) -> Target | None:
        return self._routes.get(name)

    def publish(self, routes: Mapping[str, Target]) -> None:
        """Replace the table in one step; requests already routed keep their target."""
        self._routes = MappingProxyType(dict(routes))

    def all(self) -> Mapping[str, Target]:
        return self._routes
