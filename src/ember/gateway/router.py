"""The route table: "namespace/name" → the revision that serves it. Swapped whole, never edited.

`/fn/{a}/…` is unambiguous because a function of namespace `default` may not share its name
with a namespace (the control plane refuses both ways): when `a` is a namespace, the next
segment names the function in it; otherwise `a` is a function of `default`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ember.pool.target import Target


class RouteTable:
    def __init__(self) -> None:
        self._routes: Mapping[str, Target] = MappingProxyType({})
        self._namespaces: frozenset[str] = frozenset({"default"})

    def get(self, key: str) -> Target | None:
        return self._routes.get(key)

    def resolve(self, path: str) -> tuple[str, str, str]:
        """(namespace/name key, name, rest of the path) for the part of a path after /fn/."""
        first, _, rest = path.partition("/")
        if first in self._namespaces:
            name, _, rest = rest.partition("/")
            return f"{first}/{name}", name, rest
        return f"default/{first}", first, rest

    def publish(self, routes: Mapping[str, Target], namespaces: frozenset[str]) -> None:
        """Replace the table in one step; requests already routed keep their target."""
        self._routes = MappingProxyType(dict(routes))
        self._namespaces = namespaces | {"default"}

    def all(self) -> Mapping[str, Target]:
        return self._routes
