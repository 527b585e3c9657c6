"""The route table: "namespace/name" → the revisions that serve it. Swapped whole, never edited.

`/fn/{a}/…` is unambiguous because a function of namespace `default` may not share its name
with a namespace (the control plane refuses both ways): when `a` is a namespace, the next
segment names the function in it; otherwise `a` is a function of `default`. A function
segment may end in `@alias` (`/fn/hello@canary`): names never contain `@`.

A function's `Route` has its serving revision and, when traffic weights are set, a split:
each request falls in one of 100 buckets by a hash of its request id (the caller's
`X-Request-Id`, else Ember's own), so a retry that repeats its id lands on the same revision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from types import MappingProxyType

import msgspec

from ember.pool.target import Target

BUCKETS = 100


class Route(msgspec.Struct, frozen=True):
    main: Target  # all of /fn/NAME when `split` is empty
    aliases: dict[str, Target] = {}  # /fn/NAME@ALIAS; "latest" is the newest revision
    split: tuple[tuple[int, str], ...] = ()  # (bucket bound, alias), bounds rising to 100

    def pick(self, sticky: bytes) -> tuple[Target, str]:
        """The revision (and the alias that chose it, or "") for a request id."""
        if not self.split:
            return self.main, ""
        bucket = bucket_of(sticky)
        for bound, alias in self.split:
            if bucket < bound:
                return self.aliases[alias], alias
        return self.main, ""  # unreachable when the weights sum to 100

    def targets(self) -> list[Target]:
        return [self.main, *self.aliases.values()]


def bucket_of(sticky: bytes) -> int:
    digest = hashlib.blake2b(sticky, digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def split_of(weights: list[tuple[str, int]]) -> tuple[tuple[int, str], ...]:
    """Cumulative bucket bounds of (alias, weight %) pairs; weights of 0 take no bucket."""
    bound, out = 0, []
    for alias, weight in weights:
        if weight > 0:
            bound += weight
            out.append((bound, alias))
    return tuple(out)


class RouteTable:
    def __init__(self) -> None:
        self._routes: Mapping[str, Route] = MappingProxyType({})
        self._namespaces: frozenset[str] = frozenset({"default"})

    def get(self, key: str) -> Route | None:
        return self._routes.get(key)

    def resolve(self, path: str) -> tuple[str, str, str, str]:
        """(namespace/name key, name, alias, rest of the path) for the part after /fn/."""
        first, _, rest = path.partition("/")
        if first in self._namespaces:
            segment, _, rest = rest.partition("/")
            name, _, alias = segment.partition("@")
            return f"{first}/{name}", name, alias, rest
        name, _, alias = first.partition("@")
        return f"default/{name}", name, alias, rest

    def publish(self, routes: Mapping[str, Route], namespaces: frozenset[str]) -> None:
        """Replace the table in one step; requests already routed keep their target."""
        self._routes = MappingProxyType(dict(routes))
        self._namespaces = namespaces | {"default"}

    def all(self) -> Mapping[str, Route]:
        return self._routes
