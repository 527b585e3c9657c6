"""The deployed functions as the data plane runs them: per function ("namespace/name") its
pointers from the store (serving and previous revision, aliases, rollout) and a `Target` for
every revision they name. The store is the source of truth; `load` rebuilds one function from
it after every change, and the publisher pushes what is here to the gateway and the pool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

from ember.api.bundles import Bundles
from ember.api.names import DEFAULT_NS, qualified
from ember.errors import NotFound
from ember.pool.target import Target
from ember.store.base import FunctionRecord, RevisionRecord, Store


def generation(secrets: dict[str, bytes]) -> str:
    """A short tag of the secret values (a keyed digest would add nothing: it stays in memory)."""
    if not secrets:
        return ""
    digest = hashlib.sha256()
    for name, value in sorted(secrets.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(value).digest())
    return "-" + digest.hexdigest()[:8]


def make_target(
    rec: RevisionRecord,
    code_dir: Path,
    uid: int,
    secrets: dict[str, bytes],
    layer_dir: str = "",
) -> Target:
    namespace, _, name = rec.function.partition("/")
    return Target(
        function=name,
        number=rec.number,
        sha256=rec.sha256,
        code_dir=str(code_dir),
        spec=rec.spec,
        namespace=namespace,
        uid=uid,
        secrets=secrets,
        generation=generation(secrets),
        layer_dir=layer_dir,
    )


def lists_secret(target: Target, namespace: str, secret: str) -> bool:
    return target.namespace == namespace and any(r.name == secret for r in target.spec.secrets)


class Functions:
    def __init__(
        self, store: Store, bundles: Bundles, target_of: Callable[[RevisionRecord], Target]
    ) -> None:
        self.store = store
        self.bundles = bundles
        self.target_of = target_of  # code directory, the namespace's uid, opened secrets
        self._records: dict[str, FunctionRecord] = {}
        self._revisions: dict[str, dict[int, Target]] = {}  # every revision a pointer names
        self._serving: dict[str, Target] = {}
        self._latest: dict[str, int] = {}  # newest revision number

    async def load(self, key: str) -> None:
        """Read a function's pointers and build a target for every revision they name."""
        fn, revisions = await self.store.function_and_revisions(key)
        if fn is None:
            self.forget(key)
            return
        by_number = {r.number: r for r in revisions}
        wanted = {fn.revision, max(by_number)} | {a.revision for a in fn.aliases}
        if fn.previous in by_number:  # not routed, but `ember rollback` may route it
            wanted.add(fn.previous)
        targets: dict[int, Target] = {}
        for number in sorted(wanted):
            rec = by_number.get(number)
            if rec is not None:
                await self.bundles.ensure_code(rec.bundle)
                await self.bundles.layers.ensure_installed(rec.layer)
                targets[number] = self.target_of(rec)
        self._records[key] = fn
        self._revisions[key] = targets
        self._latest[key] = max(by_number)
        self._serving[key] = targets[fn.revision]

    def forget(self, key: str) -> None:
        self._records.pop(key, None)
        self._revisions.pop(key, None)
        self._serving.pop(key, None)
        self._latest.pop(key, None)

    # ---- what is known ----
    def qualified_names(self) -> list[str]:
        return list(self._serving)

    def serving(self, key: str) -> Target | None:
        return self._serving.get(key)

    def record(self, key: str) -> FunctionRecord | None:
        return self._records.get(key)

    def revisions(self, key: str) -> dict[int, Target]:
        return dict(self._revisions.get(key, {}))

    def latest(self, key: str) -> int:
        return self._latest.get(key, 0)

    def require(self, namespace: str, name: str) -> Target:
        target = self._serving.get(qualified(namespace, name))
        if target is None:
            where = "" if namespace == DEFAULT_NS else f" in namespace '{namespace}'"
            raise NotFound(f"no function named '{name}'{where}; list functions with `ember ls`")
        return target

    def serving_in(self, namespaces: set[str] | None) -> list[Target]:
        """The serving revision of every function of `namespaces` (None: of all), by key."""
        return [
            t
            for _key, t in sorted(self._serving.items())
            if namespaces is None or t.namespace in namespaces
        ]

    def names_in(self, namespace: str) -> set[str]:
        return {t.function for t in self._serving.values() if t.namespace == namespace}

    def kept(self) -> list[Target]:
        """Every revision that serves or may serve again: routed, aliased or `previous`."""
        return [t for revs in self._revisions.values() for t in revs.values()]

    def listing(self, namespace: str, secret: str) -> list[Target]:
        """Kept revisions that list a secret."""
        return [t for t in self.kept() if lists_secret(t, namespace, secret)]

    # ---- changes without the store ----
    def retarget(self, targets: Iterable[Target]) -> None:
        """Replace kept revisions' targets by new ones of the same revisions (new secrets)."""
        for target in targets:
            revs = self._revisions.get(target.qualified)
            if revs is None or target.number not in revs:
                continue
            revs[target.number] = target
            fn = self._records[target.qualified]
            if fn.revision == target.number:
                self._serving[target.qualified] = target
