"""Publishing after a deploy or a removal builds the routes of that function only: the cost of
a deploy does not grow with the number of functions already deployed."""

from __future__ import annotations

from collections.abc import Iterable

from ember.api.publisher import Publisher
from ember.gateway.router import Route, RouteTable
from ember.pool.target import Target
from ember.spec import FunctionSpec, Quota
from ember.store.base import FunctionRecord


class Known:
    """What the publisher reads of the deployed functions (as `Functions` answers it)."""

    def __init__(self) -> None:
        self.targets: dict[str, Target] = {}

    def add(self, name: str, number: int = 1) -> str:
        spec = FunctionSpec(name=name)
        self.targets[f"default/{name}"] = Target(name, number, f"{number:064}", "/code", spec)
        return f"default/{name}"

    def qualified_names(self) -> list[str]:
        return list(self.targets)

    def serving(self, key: str) -> Target | None:
        return self.targets.get(key)

    def record(self, key: str) -> FunctionRecord | None:
        target = self.targets.get(key)
        return None if target is None else FunctionRecord(key, target.number, 0.0, 0.0)

    def revisions(self, key: str) -> dict[int, Target]:
        return {self.targets[key].number: self.targets[key]}

    def latest(self, key: str) -> int:
        return self.targets[key].number


class Serving:
    def __init__(self) -> None:
        self.by_function: dict[str, list[Target]] = {}

    @property
    def serving(self) -> list[Target]:
        return [t for targets in self.by_function.values() for t in targets]

    def serve(self, serving: Iterable[Target], standby: Iterable[Target]) -> None:
        self.by_function = {}
        for t in serving:
            self.by_function.setdefault(t.qualified, []).append(t)

    def serve_functions(self, routed: dict[str, tuple[list[Target], list[Target]]]) -> None:
        for function, (serving, _standby) in routed.items():
            if serving:
                self.by_function[function] = list(serving)
            else:
                self.by_function.pop(function, None)

    def set_quotas(self, quotas: dict[str, Quota]) -> None:
        pass


class Counting(Publisher):
    built = 0

    def route(self, key: str) -> Route:
        self.built += 1
        return super().route(key)


def test_a_deploy_or_removal_builds_only_its_own_route() -> None:
    known, table, pool = Known(), RouteTable(), Serving()
    publisher = Counting(known, table, pool)  # type: ignore[arg-type]
    for i in range(100):
        known.add(f"f{i}")
    publisher.publish()
    assert publisher.built == 100 and len(table.all()) == 100
    new = known.add("new")
    publisher.publish(changed=[new])
    assert publisher.built == 101 and table.get(new) is not None and len(pool.serving) == 101
    changed = known.add("f7", number=2)  # deployed again
    publisher.publish(changed=[changed])
    route = table.get(changed)
    assert publisher.built == 102 and route is not None and route.main.number == 2
    del known.targets["default/f3"]  # removed
    publisher.publish(changed=["default/f3"])
    assert table.get("default/f3") is None and len(table.all()) == 100
    assert publisher.built == 102
    publisher.publish()  # anything else (traffic, secrets) builds every route
    assert publisher.built == 202
