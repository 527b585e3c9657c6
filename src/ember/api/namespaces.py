"""Namespaces (tenants): their records and quotas, the names that must not meet across them, and
the quota check of a deploy."""

from __future__ import annotations

import asyncio
import time

import msgspec

from ember.api.functions import Functions
from ember.api.names import DEFAULT_NS, qualified, validate_namespace
from ember.api.publisher import Publisher
from ember.errors import QuotaExceeded, UserError
from ember.spec import FunctionSpec, Quota
from ember.store.base import NamespaceRecord, Store


class Namespaces:
    def __init__(
        self,
        store: Store,
        uid_base: int,
        functions: Functions,
        publisher: Publisher,
        writes: asyncio.Lock,
    ) -> None:
        self.store = store
        self.uid_base = uid_base  # a namespace's sandbox uid and gid: uid_base + its id
        self.functions = functions
        self.publisher = publisher
        self.writes = writes  # the control plane's one writer at a time
        self._records: dict[str, NamespaceRecord] = {}

    async def restore(self) -> None:
        self._records = {ns.name: ns for ns in await self.store.namespaces()}
        self.publisher.publish(self.quotas())

    def get(self, name: str) -> NamespaceRecord | None:
        return self._records.get(name)

    def all(self) -> list[NamespaceRecord]:
        return [ns for _name, ns in sorted(self._records.items())]

    def quotas(self) -> dict[str, Quota]:
        return {name: ns.quota for name, ns in self._records.items()}

    def uid(self, ns: NamespaceRecord) -> int:
        return self.uid_base + ns.id

    def uid_of(self, name: str) -> int:
        ns = self._records.get(name)
        return self.uid(ns) if ns is not None else self.uid_base

    async def ensure(self, name: str) -> NamespaceRecord:
        """The namespace, created when new. The caller holds the write lock."""
        ns = self._records.get(name)
        if ns is None:
            self.check_names(name, [])
            ns = self._records[name] = await self.store.ensure_namespace(name, time.time())
            self.publisher.publish(self.quotas())
        return ns

    async def set_quota(self, name: str, quota: Quota) -> NamespaceRecord:
        validate_namespace(name)
        for field, value in msgspec.structs.asdict(quota).items():
            if value < 0:
                raise UserError(f"quota {field}={value} must be >= 0 (0 = unlimited)")
        async with self.writes:
            await self.ensure(name)
            rec = await self.store.set_quota(name, quota)
            assert rec is not None
            self._records[name] = rec
            self.publisher.publish(self.quotas())
            return rec

    def check_names(self, namespace: str, specs: list[FunctionSpec]) -> None:
        """`/fn/a/b` is function `b` of namespace `a` when `a` is a namespace, else function
        `a` of namespace default: a namespace and a function of default never share a name."""
        shadowed = self.functions.serving(qualified(DEFAULT_NS, namespace))
        if namespace != DEFAULT_NS and shadowed is not None:
            raise UserError(
                f"namespace '{namespace}' would hide the function '{namespace}' of namespace "
                f"default at /fn/{namespace}; pick another namespace name",
                code="name_conflict",
                status=409,
            )
        for spec in specs:
            if namespace == DEFAULT_NS and spec.name in self._records:
                raise UserError(
                    f"'{spec.name}' is a namespace, so /fn/{spec.name}/… routes to it; name "
                    "the function otherwise, or deploy it to a namespace (--namespace)",
                    code="name_conflict",
                    status=409,
                )

    def check_deploy_quota(self, namespace: str, specs: list[FunctionSpec]) -> None:
        """The namespace's quota after a deploy of `specs`: its function count, and each
        function's zygote and one instance within its memory, scale.min within its instances."""
        ns = self._records.get(namespace)
        quota = ns.quota if ns is not None else Quota()
        total = 0
        if quota.functions:  # a pass over every function, only when it is counted
            total = len(self.functions.names_in(namespace) | {spec.name for spec in specs})
        if quota.functions and total > quota.functions:
            raise QuotaExceeded(
                f"namespace '{namespace}' would have {total} functions; its quota "
                f"max_functions is {quota.functions}: remove one (`ember rm`) or ask an admin "
                "to raise it",
            )
        for spec in specs:
            if quota.memory_mb and 2 * spec.memory > quota.memory_mb:
                raise QuotaExceeded(
                    f"function '{spec.name}' needs 2 x memory: {spec.memory} MB for its zygote "
                    f"and one instance, more than namespace '{namespace}' may use in all "
                    f"(max_memory={quota.memory_mb} MB)"
                )
            if quota.instances and spec.scale.min > quota.instances:
                raise QuotaExceeded(
                    f"function '{spec.name}' keeps scale.min={spec.scale.min} instances, more "
                    f"than namespace '{namespace}' may run (max_instances={quota.instances})"
                )
