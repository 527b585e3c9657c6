"""Publishing: what the control plane knows becomes the gateway's route table and the pool's
serving set and quotas, in one step after each change."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from ember.api.functions import Functions
from ember.gateway.router import BUCKETS, Route, RouteTable, split_of
from ember.pool.target import Target
from ember.spec import Quota


class ServingPool(Protocol):
    """What the publisher tells the pool."""

    def serve(self, serving: Iterable[Target], standby: Iterable[Target]) -> None: ...

    def serve_functions(self, routed: dict[str, tuple[list[Target], list[Target]]]) -> None: ...

    def set_quotas(self, quotas: dict[str, Quota]) -> None: ...


class Publisher:
    def __init__(
        self,
        functions: Functions,
        table: RouteTable,
        pool: ServingPool,
        published: Callable[[], None] = lambda: None,
    ) -> None:
        self.functions = functions
        self.table = table
        self.pool = pool
        self.published = published  # after each publish (the server settles its heap)
        self._quotas: dict[str, Quota] = {}  # of every namespace, as last published
        self._routes: dict[str, Route] = {}  # of every function, as last published

    def publish(
        self, quotas: dict[str, Quota] | None = None, changed: Iterable[str] | None = None
    ) -> None:
        """Push the routes of every function, and the namespaces with their quotas (`quotas`
        when they changed, else the ones published last). With `changed` (keys of functions
        deployed or removed), only their routes are built again; the others are as published
        last, so a deploy's cost does not grow with the number of functions."""
        if quotas is not None:
            self._quotas = dict(quotas)
        routed: dict[str, tuple[list[Target], list[Target]]] = {}
        if changed is None:
            self._routes = {key: self.route(key) for key in self.functions.qualified_names()}
        else:
            for key in changed:
                if self.functions.serving(key) is None:
                    self._routes.pop(key, None)
                    routed[key] = ([], [])
                else:
                    route = self._routes[key] = self.route(key)
                    routed[key] = (_serving(route), route.targets())
        routes = self._routes
        self.table.publish(routes, frozenset(self._quotas))
        self.pool.set_quotas(self._quotas)
        if changed is None:
            serving = [t for route in routes.values() for t in _serving(route)]
            self.pool.serve(serving, [t for route in routes.values() for t in route.targets()])
        else:
            self.pool.serve_functions(routed)
        self.published()

    def route(self, key: str) -> Route:
        """The serving target, the aliases' targets (plus `latest`) and, when the weights add
        up to 100, the weighted split."""
        main = self.functions.serving(key)
        fn = self.functions.record(key)
        assert main is not None and fn is not None
        revs = self.functions.revisions(key)
        aliases = {a.name: revs[a.revision] for a in fn.aliases if a.revision in revs}
        latest = revs.get(self.functions.latest(key))
        if latest is not None:
            aliases.setdefault("latest", latest)
        weights = [(a.name, a.weight) for a in fn.aliases if a.name in aliases]
        split = split_of(weights) if sum(w for _, w in weights) == BUCKETS else ()
        return Route(main=main, aliases=aliases, split=split)


def _serving(route: Route) -> list[Target]:
    """The targets that get traffic: the split's aliases, else the main one."""
    if route.split:
        return [route.aliases[alias] for _bound, alias in route.split]
    return [route.main]
