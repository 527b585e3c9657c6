"""The control plane's state machine: deploy, delete, scale, restore; it publishes routes.

The store is the source of truth; the route table and the pool are derived from it and
pushed to the data plane whenever it changes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import msgspec

from ember import auth, bundle, manifest
from ember.api.bundles import Bundles
from ember.api.delayed import Delayed
from ember.api.schemas import CanaryPlan, Deployed
from ember.api.traffic import TrafficControl, qualified
from ember.blobs.base import Blobs
from ember.config import ServerConfig
from ember.errors import EmberError, NotFound, QuotaExceeded, TooLarge, UserError
from ember.gateway.router import BUCKETS, Route, RouteTable, split_of
from ember.pool.manager import Pool
from ember.pool.target import Target
from ember.secretbox import SecretBox
from ember.spec import FunctionSpec, Quota, canonical
from ember.store.base import (
    FunctionRecord,
    KeyRecord,
    NamespaceRecord,
    RevisionRecord,
    Store,
)
from ember.telemetry.outcomes import Outcomes

log = logging.getLogger("ember.api")


CONFIG_FILES = frozenset({"ember.yaml", "ember.yml"})  # not code: revision diffs show settings
MAX_MANIFEST = 256 * 1024
MAX_FUNCTION_SECRETS = 32 * 1024  # bytes of secrets one function may list, in all
DEFAULT_NS = "default"


def validate_namespace(namespace: str) -> str:
    if not manifest.NAME_RE.match(namespace):
        raise UserError(
            f"namespace {namespace[:80]!r} is invalid: {manifest.NAME_RULE}", code="bad_name"
        )
    return namespace


def _generation(secrets: dict[str, bytes]) -> str:
    """A short tag of the secret values (a keyed digest would add nothing: it stays in memory)."""
    if not secrets:
        return ""
    digest = hashlib.sha256()
    for name, value in sorted(secrets.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(value).digest())
    return "-" + digest.hexdigest()[:8]


def revision_hash(source_tree: str, spec: FunctionSpec) -> str:
    return hashlib.sha256(source_tree.encode() + b"\0" + canonical(spec)).hexdigest()


class Control(TrafficControl):
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        blobs: Blobs,
        pool: Pool,
        routes: RouteTable,
        keys: auth.KeyTable,
        box: SecretBox,
        outcomes: Outcomes,
    ) -> None:
        self.config = config
        self.store = store
        self.blobs = blobs
        self.pool = pool
        self.routes = routes
        self.keys = keys
        self.box = box
        self.outcomes = outcomes
        self.bundles = Bundles(config.code_dir, blobs, store, config.revision_retention)
        self._targets: dict[str, Target] = {}  # the serving revision, by "namespace/name"
        self._functions: dict[str, FunctionRecord] = {}  # pointers: serving, aliases, rollout
        self._revs: dict[str, dict[int, Target]] = {}  # every revision a route points at
        self._latest: dict[str, int] = {}  # newest revision number
        self._rollout_task: asyncio.Task[None] | None = None
        self._delayed = Delayed()  # clean-ups after a grace period
        self.namespaces: dict[str, NamespaceRecord] = {}
        self._sealed: dict[tuple[str, str], bytes] = {}  # (namespace, secret) -> sealed value
        self._deploying = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.port = config.port  # the bound one, once the server listens (port 0 picks one)

    def url(self, namespace: str, name: str) -> str:
        path = name if namespace == DEFAULT_NS else f"{namespace}/{name}"
        return f"http://{self.config.host}:{self.port}/fn/{path}"

    # ---- routes ----
    def target(self, rec: RevisionRecord) -> Target:
        namespace, _, name = rec.function.partition("/")
        code_dir = self.config.code_dir / rec.bundle
        ns = self.namespaces.get(namespace)
        secrets = self._open_secrets(namespace, rec.spec)
        return Target(
            function=name,
            number=rec.number,
            sha256=rec.sha256,
            code_dir=str(code_dir),
            spec=rec.spec,
            namespace=namespace,
            uid=self.uid(ns) if ns is not None else self.config.sandbox_uid_base,
            secrets=secrets,
            generation=_generation(secrets),
        )

    def _open_secrets(self, namespace: str, spec: FunctionSpec) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for ref in spec.secrets:
            sealed = self._sealed.get((namespace, ref.name))
            if sealed is not None:
                out[ref.name] = self.box.open(namespace, ref.name, sealed)
        return out

    def publish(self) -> None:
        routes = {key: self._route(key, main) for key, main in self._targets.items()}
        self.routes.publish(routes, frozenset(self.namespaces))
        self.pool.set_quotas({name: ns.quota for name, ns in self.namespaces.items()})
        serving = [
            route.aliases[alias] for route in routes.values() for _bound, alias in route.split
        ]
        serving += [route.main for route in routes.values() if not route.split]
        self.pool.serve(serving, [t for route in routes.values() for t in route.targets()])

    def _route(self, key: str, main: Target) -> Route:
        fn = self._functions.get(key)
        revs = self._revs.get(key, {})
        if fn is None:
            return Route(main=main)
        aliases = {a.name: revs[a.revision] for a in fn.aliases if a.revision in revs}
        latest = revs.get(self._latest.get(key, 0))
        if latest is not None:
            aliases.setdefault("latest", latest)
        weights = [(a.name, a.weight) for a in fn.aliases if a.name in aliases]
        split = split_of(weights) if sum(w for _, w in weights) == BUCKETS else ()
        return Route(main=main, aliases=aliases, split=split)

    async def _load(self, key: str) -> None:
        """Read a function's pointers and build a target for every revision they name."""
        fn = await self.store.function(key)
        if fn is None:
            self._forget(key)
            return
        by_number = {r.number: r for r in await self.store.revisions(key)}
        wanted = {fn.revision, max(by_number)} | {a.revision for a in fn.aliases}
        if fn.previous in by_number:  # not routed, but `ember rollback` may route it
            wanted.add(fn.previous)
        targets: dict[int, Target] = {}
        for number in sorted(wanted):
            rec = by_number.get(number)
            if rec is not None:
                await self.bundles.ensure_code(rec.bundle)
                targets[number] = self.target(rec)
        self._functions[key] = fn
        self._revs[key] = targets
        self._latest[key] = max(by_number)
        self._targets[key] = targets[fn.revision]

    def _kept_targets(self) -> list[Target]:
        """Every revision that serves or may serve again: routed, aliased or `previous`."""
        return [t for revs in self._revs.values() for t in revs.values()]

    def _forget(self, key: str) -> None:
        self._targets.pop(key, None)
        self._functions.pop(key, None)
        self._revs.pop(key, None)
        self._latest.pop(key, None)

    def require(self, namespace: str, name: str) -> Target:
        target = self._targets.get(qualified(namespace, name))
        if target is None:
            where = "" if namespace == DEFAULT_NS else f" in namespace '{namespace}'"
            raise NotFound(f"no function named '{name}'{where}; list functions with `ember ls`")
        return target

    def functions_in(self, namespaces: set[str] | None) -> list[Target]:
        return [
            t
            for key, t in sorted(self._targets.items())
            if namespaces is None or t.namespace in namespaces
        ]

    async def restore(self) -> None:
        """After a restart: route every function's serving revision again; code from blobs."""
        self.namespaces = {ns.name: ns for ns in await self.store.namespaces()}
        self._sealed = {(r.namespace, r.name): r.sealed for r in await self.store.secrets()}
        await self._load_keys()
        for fn in await self.store.functions():
            try:
                await self._load(fn.name)
            except (EmberError, OSError, KeyError, ValueError) as exc:  # one broken: not the rest
                log.error("function %s cannot be restored: %s", fn.name, exc)
                self._forget(fn.name)
        self.publish()  # the keep-alive loop starts scale.min instances from here
        log.info("restored %d function(s)", len(self._targets))
        await self.bundles.sweep()  # what a clean-up cut short by a shutdown left

    # ---- deploy ----
    async def deploy(
        self, data: bytes, default_name: str, namespace: str, canary: CanaryPlan | None = None
    ) -> list[Deployed]:
        if len(data) > self.config.max_bundle_bytes:
            raise TooLarge(
                f"bundle of {len(data)} bytes exceeds the "
                f"{self.config.max_bundle_bytes // (1024 * 1024)} MB limit; list "
                "what to leave out in .emberignore",
                code="bundle_too_large",
            )
        validate_namespace(namespace)
        async with self._deploying:
            deployed = await self._deploy(data, default_name, namespace, canary)
            for d in deployed:
                if d.created:
                    await self.bundles.collect(qualified(namespace, d.name))
            return deployed

    async def _deploy(
        self, data: bytes, default_name: str, namespace: str, canary: CanaryPlan | None
    ) -> list[Deployed]:
        staging = self.bundles.staging()
        try:
            specs = await asyncio.to_thread(self._unpack, data, staging, default_name)
            self._admit(namespace, specs)
            if canary is not None:
                self._check_canary(namespace, specs, canary)
            plans = [await self._plan(staging, spec) for spec in specs]
            if namespace not in self.namespaces:
                self.namespaces[namespace] = await self.store.ensure_namespace(
                    namespace, time.time()
                )
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
            created_dir = await self.bundles.install(staging, digest)
            committed: list[str] = []
            try:
                results = await self._commit(namespace, plans, digest, data, committed, canary)
            except BaseException:
                if created_dir and not committed:
                    await self.bundles.remove([self.bundles.code_dir(digest)])
                raise
            if created_dir and not any(d.created for d in results):  # same code, other bundle
                await self.bundles.remove([self.bundles.code_dir(digest)])
            return results
        finally:
            await self.bundles.remove([staging])  # left when the code was there already

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
        for name in ("ember.yaml", "ember.yml"):
            path = staging / name
            if path.is_file() and path.stat().st_size > MAX_MANIFEST:
                raise UserError(
                    f"{name} is {path.stat().st_size} bytes; it may be at most "
                    f"{MAX_MANIFEST // 1024} KB",
                    code="bad_manifest",
                )
        return manifest.load_manifest(bundle.read_manifest(staging), default_name)

    async def _plan(self, staging: Path, spec: FunctionSpec) -> tuple[FunctionSpec, str, str]:
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
        tree = await asyncio.to_thread(bundle.tree_hash, source)
        code = await asyncio.to_thread(bundle.tree_hash, source, CONFIG_FILES)
        return spec, revision_hash(tree, spec), code

    def _admit(self, namespace: str, specs: list[FunctionSpec]) -> None:
        """Names, secrets and quotas, checked before anything is imported or stored."""
        if namespace != DEFAULT_NS and qualified(DEFAULT_NS, namespace) in self._targets:
            raise UserError(
                f"namespace '{namespace}' would hide the function '{namespace}' of namespace "
                f"default at /fn/{namespace}; pick another namespace name",
                code="name_conflict",
                status=409,
            )
        for spec in specs:
            if namespace == DEFAULT_NS and spec.name in self.namespaces:
                raise UserError(
                    f"'{spec.name}' is a namespace, so /fn/{spec.name}/… routes to it; name "
                    "the function otherwise, or deploy it to a namespace (--namespace)",
                    code="name_conflict",
                    status=409,
                )
            missing = [r.name for r in spec.secrets if (namespace, r.name) not in self._sealed]
            if not missing:
                self._check_secret_fit(namespace, spec, {})
            if missing:
                raise UserError(
                    f"function '{spec.name}' lists secret(s) {', '.join(missing)} that namespace "
                    f"'{namespace}' does not have; set them first: ember secrets set "
                    f"{missing[0]} --namespace {namespace}",
                    code="missing_secret",
                    status=422,
                )
        ns = self.namespaces.get(namespace)
        quota = ns.quota if ns is not None else Quota()
        existing = {t.function for t in self._targets.values() if t.namespace == namespace}
        total = len(existing | {spec.name for spec in specs})
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

    async def _commit(
        self,
        namespace: str,
        plans: list[tuple[FunctionSpec, str, str]],
        digest: str,
        data: bytes,
        committed: list[str],
        canary: CanaryPlan | None,
    ) -> list[Deployed]:
        """Probe every new revision, then store and publish them; `committed` names the ones
        the store took, so a failure half-way knows what is already live."""
        probes: list[tuple[FunctionSpec, str, Target | None, float | None, list[str]]] = []
        try:
            return await self._probe_and_store(
                namespace, plans, digest, data, committed, probes, canary
            )
        except BaseException:
            for spec, _h, prepared, _m, _w in probes:
                if prepared is not None and spec.name not in committed:
                    self.pool.discard(prepared)
            if committed:
                self.publish()
            raise

    async def _probe_and_store(
        self,
        namespace: str,
        plans: list[tuple[FunctionSpec, str, str]],
        digest: str,
        data: bytes,
        committed: list[str],
        probes: list[tuple[FunctionSpec, str, Target | None, float | None, list[str]]],
        canary: CanaryPlan | None,
    ) -> list[Deployed]:
        await self._probe(namespace, plans, digest, probes)
        if any(target is not None for _s, _h, target, _m, _w in probes):
            await self.bundles.put(data)  # only once every probe passed
        trees = {spec.name: tree for spec, _sha, tree in plans}
        results: list[Deployed] = []
        now = time.time()
        for spec, sha, _target, import_ms, warnings in probes:
            key = qualified(namespace, spec.name)
            serving = self._functions.get(key)
            rec, created = await self.store.add_revision(
                key, spec, sha, digest, now, tree=trees[spec.name], serve=canary is None
            )
            if created:
                committed.append(spec.name)
                await self._route_new_revision(key, serving, rec.number, canary, now)
                await self._load(key)
            results.append(
                Deployed(
                    name=spec.name,
                    revision=rec.number,
                    created=created,
                    sha256=sha,
                    url=self.url(namespace, spec.name),
                    namespace=namespace,
                    import_ms=import_ms,
                    warnings=warnings,
                )
            )
        self.publish()  # the keep-alive loop starts scale.min instances from here
        return results

    async def _probe(
        self,
        namespace: str,
        plans: list[tuple[FunctionSpec, str, str]],
        digest: str,
        probes: list[tuple[FunctionSpec, str, Target | None, float | None, list[str]]],
    ) -> None:
        """Start the zygote of every changed function (import + init: DeployRejected)."""
        for spec, sha, _tree in plans:
            key = qualified(namespace, spec.name)
            current = self._targets.get(key)
            if current is not None and current.sha256 == sha:
                probes.append((spec, sha, None, None, []))
                continue
            last = await self.store.revisions(key)
            number = (last[-1].number + 1) if last else 1
            target = self.target(
                RevisionRecord(
                    function=key,
                    number=number,
                    sha256=sha,
                    bundle=digest,
                    spec=spec,
                    created_at=time.time(),
                )
            )
            ready = await self.pool.prepare(target)  # import + init: DeployRejected
            probes.append((spec, sha, target, ready.import_ms, ready.warnings))

    # ---- other commands ----
    async def delete(self, namespace: str, name: str) -> None:
        async with self._deploying:  # not while a deploy of the same name is half-way
            self.require(namespace, name)
            key = qualified(namespace, name)
            bundles = {r.bundle for r in await self.store.revisions(key)}
            fn = self._functions.get(key)
            if fn is not None and fn.rollout is not None:
                self.outcomes.unwatch(key, fn.rollout.to_revision)
            grace = max((t.spec.timeout for t in self._revs.get(key, {}).values()), default=0)
            await self.store.delete_function(key)
            self._forget(key)
            self.publish()
            self._forget_function_state(key)
            # Requests still running on it finish first: they may read their code meanwhile.
            self._delayed.call(
                grace + 5.0,
                functools.partial(self._drop_bundles_locked, bundles),
                f"dropping the code of {key}",
            )

    def _forget_function_state(self, key: str) -> None:
        """`ember rm`: what the data plane keeps per function, beyond the revisions that the
        routes just retired, goes with it (so a deploy/rm loop does not grow the server)."""
        self.pool.forget_function(key)

    async def scale(self, namespace: str, name: str, instances: int) -> int:
        if instances < 0:
            raise UserError(f"instances={instances} must be >= 0", code="bad_request")
        return await self.pool.scale(self.require(namespace, name), instances)

    # ---- namespaces and quotas ----
    def uid(self, ns: NamespaceRecord) -> int:
        return self.config.sandbox_uid_base + ns.id

    async def set_quota(self, namespace: str, quota: Quota) -> NamespaceRecord:
        validate_namespace(namespace)
        for field, value in msgspec.structs.asdict(quota).items():
            if value < 0:
                raise UserError(f"quota {field}={value} must be >= 0 (0 = unlimited)")
        async with self._deploying:
            if namespace not in self.namespaces:
                self._admit(namespace, [])
                await self.store.ensure_namespace(namespace, time.time())
            rec = await self.store.set_quota(namespace, quota)
            assert rec is not None
            self.namespaces[namespace] = rec
            self.publish()
            return rec

    # ---- secrets ----
    async def set_secret(self, namespace: str, name: str, value: bytes) -> bool:
        """Store a sealed value; functions that list it get it on their next zygote start.
        True when it is new."""
        validate_namespace(namespace)
        manifest.validate_secret_name(name)
        sealed = self.box.seal(namespace, name, value)
        async with self._deploying:
            for target in self._kept_targets():  # revisions listing it must still start
                if target.namespace == namespace and any(
                    r.name == name for r in target.spec.secrets
                ):
                    self._check_secret_fit(namespace, target.spec, {name: value})
            if namespace not in self.namespaces:
                self._admit(namespace, [])
                self.namespaces[namespace] = await self.store.ensure_namespace(
                    namespace, time.time()
                )
            created = (namespace, name) not in self._sealed
            await self.store.put_secret(namespace, name, sealed, time.time())
            self._sealed[(namespace, name)] = sealed
            self._refresh_users(namespace, name)
            return created

    async def delete_secret(self, namespace: str, name: str) -> None:
        async with self._deploying:
            users = sorted(
                {
                    f"{t.function}@{t.number}"
                    for t in self._kept_targets()
                    if t.namespace == namespace and any(r.name == name for r in t.spec.secrets)
                }
            )
            if users:
                raise UserError(
                    f"secret '{name}' is listed by {', '.join(users)} (serving, aliased or the "
                    "rollback target); deploy without it and move aliases off those revisions "
                    "first",
                    code="secret_in_use",
                    status=409,
                )
            if not await self.store.delete_secret(namespace, name):
                raise NotFound(f"namespace '{namespace}' has no secret '{name}'")
            self._sealed.pop((namespace, name), None)

    def _check_secret_fit(self, namespace: str, spec: FunctionSpec, new: dict[str, bytes]) -> None:
        """A function's secrets travel in one control message and its env form must be text:
        at most MAX_FUNCTION_SECRETS bytes in all, UTF-8 where `env:` is asked for. `new`
        holds values about to replace stored ones."""
        total = 0
        for ref in spec.secrets:
            value = new.get(ref.name)
            if value is None:
                value = self.box.open(namespace, ref.name, self._sealed[(namespace, ref.name)])
            total += len(value)
            if ref.env:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(
                        f"secret '{ref.name}' is not UTF-8 text, so function '{spec.name}' "
                        f"cannot have it as ${ref.env}; read /run/secrets/{ref.name} instead",
                        code="secret_not_text",
                        status=422,
                    ) from None
        if total > MAX_FUNCTION_SECRETS:
            raise UserError(
                f"function '{spec.name}' would get {total} bytes of secrets; at most "
                f"{MAX_FUNCTION_SECRETS // 1024} KB in all: keep large material in the bundle "
                "and only its key in a secret",
                code="secrets_too_large",
                status=422,
            )

    def secret_names(self, namespace: str) -> list[str]:
        return sorted(name for ns, name in self._sealed if ns == namespace)

    def _refresh_users(self, namespace: str, secret: str) -> None:
        """Functions listing the secret get new targets: new requests go to a new zygote with
        the new value; requests on the old one finish there, then it is reaped."""
        for key, revs in self._revs.items():
            for number, target in list(revs.items()):
                if target.namespace == namespace and any(
                    r.name == secret for r in target.spec.secrets
                ):
                    secrets = self._open_secrets(namespace, target.spec)
                    revs[number] = msgspec.structs.replace(
                        target, secrets=secrets, generation=_generation(secrets)
                    )
            fn = self._functions.get(key)
            if fn is not None and fn.revision in revs:
                self._targets[key] = revs[fn.revision]
        self.publish()

    # ---- API keys ----
    async def _load_keys(self) -> None:
        self.keys.replace(
            auth.Key(
                id=k.id, digest=k.digest, name=k.name, scopes=k.scopes, rate=k.rate, burst=k.burst
            )
            for k in await self.store.keys()
            if k.revoked_at is None
        )

    async def create_key(self, name: str, scopes: list[str], rate: float, burst: int) -> str:
        """A new key; the token is returned once and never stored."""
        scopes = auth.validate_scopes(scopes)
        if not (rate == 0 or 0.001 <= rate <= 1e6) or not 0 <= burst <= 1_000_000:
            raise UserError(
                f"rate={rate:g} must be 0 (unlimited) or 0.001-1000000 requests/s and "
                f"burst={burst} 0-1000000"
            )
        key_id, token, digest = auth.new_token()
        await self.store.add_key(
            KeyRecord(
                id=key_id,
                digest=digest,
                name=name[:100],
                scopes=scopes,
                rate=rate,
                burst=burst,
                created_at=time.time(),
            )
        )
        await self._load_keys()
        return token

    async def revoke_key(self, key_id: str) -> None:
        if not await self.store.revoke_key(key_id, time.time()):
            raise NotFound(f"no active key with id '{key_id[:40]}'; list them with `ember keys ls`")
        await self._load_keys()

    async def ensure_admin_credentials(self) -> None:
        """On first start (or when the file is gone): an admin key in EMBER_HOME/credentials,
        0600, for the CLI on this machine. Whoever can read EMBER_HOME is admin anyway."""
        path = self.config.credentials_path
        if path.exists():
            try:
                self.keys.verify(f"Bearer {path.read_text().strip()}")
                return
            except EmberError:
                log.warning("%s holds no valid key; writing a new admin key", path)
        token = await self.create_key("admin (credentials file)", ["admin"], 0.0, 0)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        tmp.replace(path)
        log.info("admin key written to %s", path)
