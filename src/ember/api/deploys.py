"""Deploys and removals: a bundle becomes revisions (unpacked, checked, probed, stored, published),
and `ember rm` takes a function away; `ember scale` sets its instances now."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from ember import bundle, manifest
from ember.api.bundles import Bundles, read_only
from ember.api.delayed import Delayed
from ember.api.functions import Functions
from ember.api.names import Address, qualified, validate_namespace
from ember.api.namespaces import Namespaces
from ember.api.publisher import Publisher
from ember.api.schemas import CanaryPlan, Deployed, LayerInfo
from ember.api.secrets import Secrets
from ember.api.traffic import Traffic
from ember.config import ServerConfig
from ember.errors import RequirementsError, TooLarge, UserError
from ember.layers import requirements
from ember.layers.builder import Layer, Layers, Progress
from ember.layers.requirements import Requirements
from ember.pool.target import Target
from ember.spec import FunctionSpec, TriggerSpec, canonical
from ember.store.base import BuildRecord, RevisionRecord, Store
from ember.wire.messages import ZygoteReady

log = logging.getLogger("ember.api")

CONFIG_FILES = frozenset({"ember.yaml", "ember.yml"})  # not code: revision diffs show settings
MAX_MANIFEST = 256 * 1024
DROP_AFTER = 5.0  # seconds past the longest timeout before a removed function's code goes


def revision_hash(source_tree: str, spec: FunctionSpec) -> str:
    return hashlib.sha256(source_tree.encode() + b"\0" + canonical(spec)).hexdigest()


class DeployPool(Protocol):
    """What a deploy asks of the pool: probe a new revision, or let it go; scale."""

    async def prepare(self, target: Target) -> ZygoteReady: ...

    def discard(self, target: Target) -> None: ...

    async def scale(self, target: Target, instances: int) -> int: ...


class TriggerHooks(Protocol):
    """ember.triggers.manager.Triggers, as a deploy sees it."""

    async def check(
        self, function: str, specs: Sequence[TriggerSpec], allow_errors: bool
    ) -> None: ...

    async def apply(self, function: str, specs: Sequence[TriggerSpec]) -> None: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """One function of a bundle: its spec and the hashes of its revision and code tree."""

    spec: FunctionSpec
    sha256: str
    tree: str
    requirements: Requirements | None = None
    layer: Layer | None = None  # its requirements, installed


@dataclass(frozen=True, slots=True)
class Staged:
    """An unpacked bundle: a plan per function and the bundle's sha256."""

    plans: list[Plan]
    digest: str


@dataclass(frozen=True, slots=True)
class Probe:
    """A function whose code changed got a zygote (`target`); one that did not, none."""

    plan: Plan
    target: Target | None = None
    import_ms: float | None = None
    warnings: tuple[str, ...] = ()


Report = Callable[[str, Progress], None]  # function name, step


def _quiet(name: str, step: Progress) -> None:
    pass


class Deploys:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        bundles: Bundles,
        functions: Functions,
        namespaces: Namespaces,
        secrets: Secrets,
        traffic: Traffic,
        publisher: Publisher,
        pool: DeployPool,
        address: Address,
        writes: asyncio.Lock,
        forget_function: Callable[[str], None],
        layers: Layers,
    ) -> None:
        self.config = config  # the bundle limits
        self.layers = layers
        self.store = store
        self.bundles = bundles
        self.functions = functions
        self.namespaces = namespaces
        self.secrets = secrets
        self.traffic = traffic
        self.publisher = publisher
        self.pool = pool
        self.address = address
        self.writes = writes
        # What the data plane keeps per function ("namespace/name"): pool, metrics, logs.
        self.forget_function = forget_function
        self.delayed = Delayed()  # clean-ups after a grace period
        self.triggers: TriggerHooks | None = None  # set by the server once its queue runs

    async def deploy(
        self,
        data: bytes,
        default_name: str,
        namespace: str,
        canary: CanaryPlan | None = None,
        report: Report = _quiet,
        allow_trigger_errors: bool = False,
    ) -> list[Deployed]:
        """`report` hears of each step (of builds and imports) as it happens. Triggers are
        checked (their brokers reached) first; `allow_trigger_errors` keeps wrong ones,
        failing, instead of refusing the deploy."""
        if len(data) > self.config.max_bundle_bytes:
            raise TooLarge(
                f"bundle of {len(data)} bytes exceeds the "
                f"{self.config.max_bundle_bytes // (1024 * 1024)} MB limit; list "
                "what to leave out in .emberignore",
                code="bundle_too_large",
            )
        validate_namespace(namespace)
        staging = self.bundles.staging()
        placed = False
        built: list[Plan] = []  # with their layers, pinned until the end
        try:
            # Outside the write lock, so that other deploys, `scale` and `rm` go on meanwhile:
            # one worker-thread hop for all the file work of the bundle (each hop is a wake-up
            # of the loop, and on a busy host a wait for the GIL), and the builds of the
            # functions' requirements, which can take minutes (their layers are pinned: no
            # clean-up takes them before the revisions that use them are stored).
            staged = await asyncio.to_thread(self._stage, data, staging, default_name)
            self._check_deployable(namespace, [plan.spec for plan in staged.plans], canary)
            await self._check_triggers(namespace, staged.plans, allow_trigger_errors)
            for plan in staged.plans:
                built.append(await self._build(plan, namespace, report))
            async with self.writes:
                placed = self.bundles.place(staging, staged.digest)
                deployed = await self._deploy(
                    namespace, canary, report, replace(staged, plans=built), placed, data
                )
                for d in deployed:  # a function with no more revisions than it keeps: none go
                    if d.created and d.revision > self.bundles.retention:
                        await self.bundles.collect(qualified(namespace, d.name))
                if self.triggers is not None:
                    for plan in built:
                        key = qualified(namespace, plan.spec.name)
                        await self.triggers.apply(key, plan.spec.triggers)
                return deployed
        finally:
            self.layers.unpin(plan.layer.digest for plan in built if plan.layer is not None)
            if not placed:  # placed: nothing is left there
                await self.bundles.remove([staging])

    async def _deploy(
        self,
        namespace: str,
        canary: CanaryPlan | None,
        report: Report,
        staged: Staged,
        placed: bool,
        data: bytes,
    ) -> list[Deployed]:
        """Under the write lock, with the code at its content address (`placed`: by this
        deploy, which takes it away again when no revision comes to use it)."""
        plans, digest = staged.plans, staged.digest
        committed: list[str] = []
        try:
            self._check_deployable(namespace, [plan.spec for plan in plans], canary)
            await self.namespaces.ensure(namespace)
            results = await self._commit(namespace, plans, digest, data, committed, canary, report)
        except BaseException:
            if placed and not committed:
                await self.bundles.remove([self.bundles.code_dir(digest)])
            raise
        if placed and not any(d.created for d in results):  # same code elsewhere
            await self.bundles.remove([self.bundles.code_dir(digest)])
        return results

    def _stage(self, data: bytes, staging: Path, default_name: str) -> Staged:
        """On a worker thread: unpack, read the manifest and the requirements, hash every
        function's tree and the bundle, and make the code read-only."""
        specs = self._unpack(data, staging, default_name)
        plans = [self._plan(staging, spec) for spec in specs]
        read_only(staging)
        return Staged(plans, hashlib.sha256(data).hexdigest())

    def _unpack(self, data: bytes, staging: Path, default_name: str) -> list[FunctionSpec]:
        """Unpack and read the manifest, off the event loop (both can be slow on hostile input)."""
        try:
            bundle.unpack(
                data,
                staging,
                max_unpacked_bytes=self.config.max_unpacked_bytes,
                max_files=self.config.max_bundle_files,
            )
        except OSError as exc:
            raise UserError(
                f"the bundle cannot be unpacked here: {exc.strerror}", code="bad_bundle"
            ) from None
        for name in CONFIG_FILES:
            path = staging / name
            if path.is_file() and path.stat().st_size > MAX_MANIFEST:
                raise UserError(
                    f"{name} is {path.stat().st_size} bytes; it may be at most "
                    f"{MAX_MANIFEST // 1024} KB",
                    code="bad_manifest",
                )
        return manifest.load_manifest(bundle.read_manifest(staging), default_name)

    def _check_deployable(
        self, namespace: str, specs: list[FunctionSpec], canary: CanaryPlan | None
    ) -> None:
        """Names, secrets, quotas and the rollout, checked before anything is imported or
        stored."""
        self.namespaces.check_names(namespace, specs)
        for spec in specs:
            self.secrets.check_listed(namespace, spec)
            self._check_destinations(spec)
        self.namespaces.check_deploy_quota(namespace, specs)
        if canary is not None:
            self.traffic.check_canary(namespace, specs, canary)

    async def _check_triggers(self, namespace: str, plans: list[Plan], allow: bool) -> None:
        if self.triggers is None:
            return
        for plan in plans:
            key = qualified(namespace, plan.spec.name)
            await self.triggers.check(key, plan.spec.triggers, allow)

    def _check_destinations(self, spec: FunctionSpec) -> None:
        """A NATS subject as a destination needs the NATS queue (docs/async.md)."""
        if self.config.queue.startswith(("nats://", "tls://")):
            return
        for which in ("on_success", "on_failure"):
            dest = getattr(spec.async_, which)
            if dest is not None and dest.subject:
                raise UserError(
                    f"function '{spec.name}': async.{which}.subject {dest.subject!r} needs the "
                    "NATS queue, and this server keeps its queue in SQLite; start it with "
                    "ember up --queue nats://HOST:4222, or send to a function or url instead",
                    code="bad_manifest",
                )

    def _plan(self, staging: Path, spec: FunctionSpec) -> Plan:
        source = staging / spec.source
        if not source.is_dir():
            raise UserError(
                f"function '{spec.name}': source '{spec.source}' is not a directory in the bundle",
                code="bad_manifest",
            )
        module_file = source / (spec.module.replace(".", "/") + ".py")
        package_init = source / spec.module.replace(".", "/") / "__init__.py"
        if not module_file.is_file() and not package_init.is_file():
            raise UserError(
                f"function '{spec.name}': handler module '{spec.module}' not found: no "
                f"{spec.source.rstrip('/')}/{spec.module.replace('.', '/')}.py in the bundle; "
                "add it or set handler: in ember.yaml",
                code="bad_manifest",
            )
        tree = bundle.tree_hash(source)
        code = bundle.tree_hash(source, CONFIG_FILES)
        return Plan(spec, revision_hash(tree, spec), code, requirements.read(source))

    async def _build(self, plan: Plan, namespace: str, report: Report) -> Plan:
        """A function with requirements gets its layer (built unless there) and a revision
        hash that includes it: the same code with other packages is another revision."""
        if plan.requirements is None:
            return plan
        try:
            layer = await self.layers.ensure(
                plan.requirements,
                lambda step: report(plan.spec.name, step),
                pin=True,
                namespace=namespace,
            )
        except RequirementsError as exc:
            message = f"function '{plan.spec.name}': {exc.message}"
            raise RequirementsError(message, code=exc.code) from None
        sha = hashlib.sha256(f"{plan.sha256}\0{layer.digest}".encode()).hexdigest()
        return replace(plan, layer=layer, sha256=sha)

    async def _commit(
        self,
        namespace: str,
        plans: list[Plan],
        digest: str,
        data: bytes,
        committed: list[str],
        canary: CanaryPlan | None,
        report: Report,
    ) -> list[Deployed]:
        """Probe every new revision, then store and publish them; `committed` names the ones
        the store took, so a failure half-way knows what is already live."""
        probes: list[Probe] = []
        # The blob is written (and fsynced) on a worker thread while the zygotes import; when
        # no revision is stored after all, a blob this deploy wrote is deleted again.
        storing = asyncio.ensure_future(self.bundles.put_new(data, digest))
        new_blob = False
        try:
            try:
                await self._probe(namespace, plans, digest, probes, report)
            finally:
                new_blob = await storing
            results = [await self._store(namespace, p, digest, committed, canary) for p in probes]
            if new_blob and not committed:  # same code under another bundle: nothing stored
                await self.bundles.drop_blob(digest)
            # the keep-alive loop starts scale.min instances from here
            self.publisher.publish(changed=[qualified(namespace, n) for n in committed])
            return results
        except BaseException:
            for p in probes:
                if p.target is not None and p.plan.spec.name not in committed:
                    self.pool.discard(p.target)
            if new_blob and not committed:
                await self.bundles.drop_blob(digest)
            if committed:
                self.publisher.publish(changed=[qualified(namespace, n) for n in committed])
            raise

    async def _probe(
        self, namespace: str, plans: list[Plan], digest: str, probes: list[Probe], report: Report
    ) -> None:
        """Start the zygote of every changed function (import + init: DeployRejected)."""
        for plan in plans:
            key = qualified(namespace, plan.spec.name)
            current = self.functions.serving(key)
            if current is not None and current.sha256 == plan.sha256:
                probes.append(Probe(plan))
                continue
            last = await self.store.revisions(key)
            number = (last[-1].number + 1) if last else 1
            target = self.functions.target_of(
                RevisionRecord(
                    function=key,
                    number=number,
                    sha256=plan.sha256,
                    bundle=digest,
                    spec=plan.spec,
                    created_at=time.time(),
                    layer=plan.layer.digest if plan.layer else "",
                )
            )
            report(plan.spec.name, Progress("importing"))
            ready = await self.pool.prepare(target)  # import + init: DeployRejected
            probes.append(Probe(plan, target, ready.import_ms, tuple(ready.warnings)))

    async def _store(
        self,
        namespace: str,
        probe: Probe,
        digest: str,
        committed: list[str],
        canary: CanaryPlan | None,
    ) -> Deployed:
        spec, now = probe.plan.spec, time.time()
        key = qualified(namespace, spec.name)
        serving = self.functions.record(key)
        layer = probe.plan.layer
        rec, created = await self.store.add_revision(
            key,
            spec,
            probe.plan.sha256,
            digest,
            now,
            tree=probe.plan.tree,
            serve=canary is None,
            layer=layer.digest if layer else "",
            build=None
            if layer is None
            else BuildRecord(
                function=key,
                revision=0,
                layer=layer.digest,
                packages=list(layer.packages),
                bytes=layer.bytes,
                build_ms=round(layer.build_ms, 1),
                built=layer.built,
                log=layer.log,
                created_at=now,
            ),
        )
        if created:
            committed.append(spec.name)
            await self.traffic.route_new_revision(key, serving, rec.number, canary, now)
            await self.functions.load(key)
        return Deployed(
            name=spec.name,
            revision=rec.number,
            created=created,
            sha256=probe.plan.sha256,
            url=self.address.url(namespace, spec.name),
            namespace=namespace,
            import_ms=probe.import_ms,
            warnings=list(probe.warnings),
            layer=None
            if layer is None
            else LayerInfo(
                digest=layer.digest,
                packages=list(layer.packages),
                built=layer.built,
                build_ms=round(layer.build_ms, 1),
            ),
        )

    # ---- other commands ----
    async def delete(self, namespace: str, name: str) -> None:
        async with self.writes:  # not while a deploy of the same name is half-way
            self.functions.require(namespace, name)
            key = qualified(namespace, name)
            bundles = {r.bundle for r in await self.store.revisions(key)}
            self.traffic.forget(key)
            revisions = self.functions.revisions(key).values()
            grace = max((t.spec.timeout for t in revisions), default=0)
            await self.store.delete_function(key)
            self.functions.forget(key)
            self.publisher.publish(changed=[key])
            self.forget_function(key)  # a deploy/rm loop must not grow the server
            # Requests still running on it finish first: they may read their code meanwhile.
            self.delayed.call(
                grace + DROP_AFTER,
                functools.partial(self._drop_bundles, bundles, key),
                f"dropping the code of {key}",
            )

    async def _drop_bundles(self, candidates: set[str], removed: str) -> None:
        async with self.writes:
            await self.bundles.drop_unused(candidates)
            if self.functions.record(removed) is None:  # not deployed again since: what its
                self.forget_function(removed)  # last requests recorded after `rm` goes too

    async def scale(self, namespace: str, name: str, instances: int) -> int:
        if instances < 0:
            raise UserError(f"instances={instances} must be >= 0", code="bad_request")
        return await self.pool.scale(self.functions.require(namespace, name), instances)
