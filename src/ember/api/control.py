"""The control plane's state machine: deploy, delete, scale, restore; it publishes routes.

The store is the source of truth; the route table and the pool are derived from it and
pushed to the data plane whenever it changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
import time
from pathlib import Path

from ember import bundle, manifest
from ember.api.schemas import Deployed
from ember.blobs.base import Blobs
from ember.config import ServerConfig
from ember.errors import EmberError, NotFound, TooLarge, UserError
from ember.gateway.router import RouteTable
from ember.pool.manager import Pool
from ember.pool.target import Target
from ember.spec import FunctionSpec, canonical
from ember.store.base import RevisionRecord, Store

log = logging.getLogger("ember.api")


MAX_MANIFEST = 256 * 1024


def _read_only(root: Path) -> None:
    """Code directories are shared by revisions: files lose their write bits. (Zygotes do not
    write `__pycache__` either; byte-compiling here would hold the server's GIL per file.)"""
    root.chmod(0o755)  # readable by the sandboxes' unprivileged uids, writable by none
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode & 0o555)


def revision_hash(source_tree: str, spec: FunctionSpec) -> str:
    return hashlib.sha256(source_tree.encode() + b"\0" + canonical(spec)).hexdigest()


class Control:
    def __init__(
        self, config: ServerConfig, store: Store, blobs: Blobs, pool: Pool, routes: RouteTable
    ) -> None:
        self.config = config
        self.store = store
        self.blobs = blobs
        self.pool = pool
        self.routes = routes
        self._targets: dict[str, Target] = {}
        self._deploying = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.port = config.port  # the bound one, once the server listens (port 0 picks one)

    def url(self, name: str) -> str:
        return f"http://{self.config.host}:{self.port}/fn/{name}"

    # ---- routes ----
    def target(self, rec: RevisionRecord) -> Target:
        code_dir = self.config.code_dir / rec.bundle
        return Target(
            function=rec.function,
            number=rec.number,
            sha256=rec.sha256,
            code_dir=str(code_dir),
            spec=rec.spec,
        )

    def publish(self) -> None:
        self.routes.publish(self._targets)
        self.pool.retire_all_but(t.key for t in self._targets.values())

    def require(self, name: str) -> Target:
        target = self._targets.get(name)
        if target is None:
            raise NotFound(f"no function named '{name}'; list functions with `ember ls`")
        return target

    async def restore(self) -> None:
        """After a restart: route every function's serving revision again; code from blobs."""
        for fn in await self.store.functions():
            rec = await self.store.revision(fn.name, fn.revision)
            if rec is None:
                log.error("function %s points at missing revision %d", fn.name, fn.revision)
                continue
            try:
                await asyncio.to_thread(self._ensure_code, rec.bundle)
            except (EmberError, OSError) as exc:  # one broken function must not stop the rest
                log.error("function %s cannot be restored: %s", fn.name, exc)
                continue
            self._targets[fn.name] = self.target(rec)
        self.publish()  # the keep-alive loop starts scale.min instances from here
        log.info("restored %d function(s)", len(self._targets))

    def _ensure_code(self, digest: str) -> Path:
        path = self.config.code_dir / digest
        if not path.exists():
            tmp = Path(tempfile.mkdtemp(dir=self.config.code_dir, prefix=".tmp-"))
            shutil.rmtree(tmp)
            bundle.unpack(self.blobs.get(digest), tmp)
            tmp.rename(path)
            _read_only(path)
        return path

    # ---- deploy ----
    async def deploy(self, data: bytes, default_name: str) -> list[Deployed]:
        if len(data) > self.config.max_bundle_bytes:
            raise TooLarge(
                f"bundle of {len(data)} bytes exceeds the "
                f"{self.config.max_bundle_bytes // (1024 * 1024)} MB limit; list "
                "what to leave out in .emberignore",
                code="bundle_too_large",
            )
        async with self._deploying:
            return await self._deploy(data, default_name)

    async def _deploy(self, data: bytes, default_name: str) -> list[Deployed]:
        self.config.code_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.config.code_dir, prefix=".tmp-"))
        shutil.rmtree(staging)
        try:
            specs = await asyncio.to_thread(self._unpack, data, staging, default_name)
            plans = [await self._plan(staging, spec) for spec in specs]
            digest = hashlib.sha256(data).hexdigest()
            code_dir = self.config.code_dir / digest
            created_dir = not code_dir.exists()
            if created_dir:
                staging.rename(code_dir)
                await asyncio.to_thread(_read_only, code_dir)
            committed: list[str] = []
            try:
                results = await self._commit(plans, digest, data, committed)
            except BaseException:
                if created_dir and not committed:
                    shutil.rmtree(code_dir, ignore_errors=True)
                raise
            if created_dir and not any(d.created for d in results):
                shutil.rmtree(code_dir, ignore_errors=True)  # same code under another bundle
            return results
        finally:
            shutil.rmtree(staging, ignore_errors=True)

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

    async def _plan(self, staging: Path, spec: FunctionSpec) -> tuple[FunctionSpec, str]:
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
        return spec, revision_hash(tree, spec)

    async def _commit(
        self,
        plans: list[tuple[FunctionSpec, str]],
        digest: str,
        data: bytes,
        committed: list[str],
    ) -> list[Deployed]:
        """Probe every new revision, then store and publish them; `committed` names the ones
        the store took, so a failure half-way knows what is already live."""
        probes: list[tuple[FunctionSpec, str, Target | None, float | None, list[str]]] = []
        try:
            return await self._probe_and_store(plans, digest, data, committed, probes)
        except BaseException:
            for spec, _h, prepared, _m, _w in probes:
                if prepared is not None and spec.name not in committed:
                    self.pool.discard(prepared)
            if committed:
                self.publish()
            raise

    async def _probe_and_store(
        self,
        plans: list[tuple[FunctionSpec, str]],
        digest: str,
        data: bytes,
        committed: list[str],
        probes: list[tuple[FunctionSpec, str, Target | None, float | None, list[str]]],
    ) -> list[Deployed]:
        for spec, sha in plans:
            current = self._targets.get(spec.name)
            if current is not None and current.sha256 == sha:
                probes.append((spec, sha, None, None, []))
                continue
            last = await self.store.revisions(spec.name)
            number = (last[-1].number + 1) if last else 1
            target = Target(
                function=spec.name,
                number=number,
                sha256=sha,
                code_dir=str(self.config.code_dir / digest),
                spec=spec,
            )
            ready = await self.pool.prepare(target)  # import + init: DeployRejected
            probes.append((spec, sha, target, ready.import_ms, ready.warnings))
        if any(target is not None for _s, _h, target, _m, _w in probes):
            await asyncio.to_thread(self.blobs.put, data)  # only once every probe passed
        results: list[Deployed] = []
        now = time.time()
        for spec, sha, _target, import_ms, warnings in probes:
            rec, created = await self.store.add_revision(spec, sha, digest, now)
            if created:
                committed.append(spec.name)
                self._targets[spec.name] = self.target(rec)
            results.append(
                Deployed(
                    name=spec.name,
                    revision=rec.number,
                    created=created,
                    sha256=sha,
                    url=self.url(spec.name),
                    import_ms=import_ms,
                    warnings=warnings,
                )
            )
        self.publish()  # the keep-alive loop starts scale.min instances from here
        return results

    # ---- other commands ----
    async def delete(self, name: str) -> None:
        async with self._deploying:  # not while a deploy of the same name is half-way
            self.require(name)
            await self.store.delete_function(name)
            self._targets.pop(name, None)
            self.publish()

    async def scale(self, name: str, instances: int) -> int:
        if instances < 0:
            raise UserError(f"instances={instances} must be >= 0", code="bad_request")
        return await self.pool.scale(self.require(name), instances)
