"""Layers: a function's requirements resolved into a lock and installed once, read-only, under
EMBER_HOME/layers/<lock digest>, shared by every revision whose lock is the same.

uv does the work (`ember.layers.uv`: `uv pip compile` resolves, `uv pip install --target`
installs from its cache, hard-linking files where it can: which is why a layer is never
writable), from wheels. Requirements that only source distributions satisfy have their build
scripts run in a throw-away sandbox of the deploying namespace (`in_sandbox`, given by
ember.api.source_builds) and become a layer of that namespace alone.

A resolution is kept per input (the requirements, the index settings and the interpreter): a
redeploy of the same requirements reuses its lock and, with it, its layer, without asking the
index again. New upstream versions reach a function when its requirements change.

A build is published atomically: it is installed into a staging directory, made read-only,
described in `layer.json` and renamed to its digest; a failed, timed-out or interrupted build
leaves only staging directories, swept at the next start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import secrets
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ember.errors import RequirementsError
from ember.layers import disk, uv
from ember.layers.disk import SITE, STAGING
from ember.layers.requirements import Requirements

log = logging.getLogger("ember.layers")

TRASH = ".trash-"
META = "layer.json"


class Progress(msgspec.Struct, frozen=True, omit_defaults=True):
    """One step of a build, as `ember deploy` shows it while it runs."""

    # resolving | resolved | installing | downloading (a package over ~1 MB, its size; uv names
    # no smaller ones) | installed; from source: building | built
    phase: str
    packages: list[str] = []  # resolved: "name==version"
    reused: bool = False  # resolved: the lock of an earlier deploy; installed: the layer was there
    bytes: int = 0  # installed: the layer's size; downloading: the package's
    ms: float = 0.0  # time the step took


Report = Callable[[Progress], None]


def _downloads(report: Report) -> Callable[[str], None]:
    """What uv says, heard for the downloads it names: each reported as it starts (while
    resolving, when the index offers no metadata alone; or while installing)."""

    def heard(line: str) -> None:
        if (download := uv.downloading(line)) is not None:
            report(Progress("downloading", [download[0]], bytes=download[1]))

    return heard


def _ignore(_: Progress) -> None:
    pass


@dataclass(frozen=True, slots=True)
class SourceBuild:
    """What a build in a namespace's sandbox gave: a tar.gz of `site/`, `lock.txt` and
    `build.log`, or the step that failed ("compile" or "install") and uv's message."""

    archive: bytes = b""
    failed: str = ""
    message: str = ""


BuildInSandbox = Callable[[str, str, list[str]], Awaitable[SourceBuild]]


class LayerMeta(msgspec.Struct, frozen=True):
    """`layer.json`: written last, before the layer is renamed into place."""

    digest: str
    packages: list[str]  # "name==version", as locked
    bytes: int  # installed size
    build_ms: float  # the install alone
    created_at: float
    platform: str  # interpreter cache tag and platform the lock is for


@dataclass(frozen=True, slots=True)
class Layer:
    digest: str
    path: Path  # the layer directory; its `site` goes on sys.path
    packages: tuple[str, ...]  # "name==version" as locked
    built: bool  # this deploy installed it (False: it was there)
    build_ms: float
    log: str  # what the resolver and the installer said (kept with the revision)
    bytes: int  # installed size

    @property
    def site(self) -> Path:
        return self.path / SITE


def _platform() -> str:
    return f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"


class Layers:
    """Builds run outside the control plane's write lock, one at a time per set of
    requirements (and per layer when one is installed again); clean-ups, under the lock,
    leave alone what a deploy under way built or uses (`pin`) and builds' staging."""

    def __init__(
        self,
        root: Path,
        index: uv.PackageIndex,
        timeout: float,
        max_bytes: int,
        cache: Path | None = None,
    ) -> None:
        self.root = root
        self.index = index
        self.max_bytes = max_bytes
        # uv, with its cache of the wheels downloaded once
        self.uv = uv.Uv(index, cache or root / ".cache", timeout)
        self.locks = root / ".locks"  # a resolution per input digest
        # Builds run outside the control plane's write lock: one at a time per input, and
        # what they make is kept from clean-ups until the deploy that made it is done.
        self._building: dict[str, asyncio.Lock] = {}
        self._waiting: collections.Counter[str] = collections.Counter()
        self._pinned: collections.Counter[str] = collections.Counter()
        self._staging: set[str] = set()
        # Requirements that need build scripts run are built by this, in a sandbox of the
        # deploying namespace (ember.api.source_builds); None: refused.
        self.in_sandbox: BuildInSandbox | None = None

    def path(self, digest: str) -> Path:
        return self.root / digest

    def site(self, digest: str) -> str:
        """The directory a revision with this layer puts on its sys.path; "" for none."""
        return str(self.path(digest) / SITE) if digest else ""

    def unpin(self, digests: Iterable[str]) -> None:
        for digest in digests:
            self._pinned[digest] -= 1
            if self._pinned[digest] <= 0:
                del self._pinned[digest]

    async def ensure(
        self,
        reqs: Requirements,
        report: Report = _ignore,
        *,
        pin: bool = False,
        namespace: str = "",
    ) -> Layer:
        """The layer of these requirements: resolved (or its lock reused), and installed
        unless it is there. A bad requirement or a failed build is a `RequirementsError` (422).
        `report` hears of each step as it starts and ends. With `pin`, the layer is kept from
        clean-ups until `unpin`. Requirements that only source distributions satisfy are built
        in a sandbox of `namespace`, into a layer of that namespace alone."""
        key = _input_key(self.index, reqs)
        async with self._one_at_a_time(key):
            try:
                layer = await self._ensure(reqs, key, report)
            except RequirementsError as exc:
                if not (namespace and self.in_sandbox and uv.needs_building(exc)):
                    raise
                layer = await self._from_source(reqs, key, namespace, report)
            if pin:
                self._pinned[layer.digest] += 1
            return layer

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, key: str) -> AsyncIterator[None]:
        lock = self._building.setdefault(key, asyncio.Lock())
        self._waiting[key] += 1
        try:
            async with lock:
                yield
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key], self._building[key]

    async def _ensure(self, reqs: Requirements, key: str, report: Report) -> Layer:
        t0 = time.perf_counter()
        log: list[str] = []
        report(Progress("resolving"))
        lock, reused = await self._lock(reqs, key, log, report)
        digest = hashlib.sha256(f"{_platform()}\0{lock}".encode()).hexdigest()
        packages = tuple(uv.pins(lock))
        t1 = time.perf_counter()
        report(Progress("resolved", list(packages), reused, ms=round((t1 - t0) * 1e3, 1)))
        built = not self.path(digest).is_dir()
        if built:
            report(Progress("installing", list(packages)))
            await self._install(reqs, lock, digest, packages, log, report)
        else:
            log.append(f"layer {digest} is installed already: nothing to install")
        meta = await asyncio.to_thread(self.meta, digest)
        report(
            Progress(
                "installed",
                reused=not built,
                bytes=meta.bytes,
                ms=round((time.perf_counter() - t1) * 1e3, 1),
            )
        )
        ms = (time.perf_counter() - t0) * 1e3
        return Layer(digest, self.path(digest), packages, built, ms, "\n".join(log), meta.bytes)

    async def _from_source(
        self, reqs: Requirements, key: str, namespace: str, report: Report
    ) -> Layer:
        """A layer whose packages' build scripts ran in a sandbox of `namespace`. It is that
        namespace's alone (its digest says so): what one tenant's build produced never runs
        for another, whatever its lock says."""
        assert self.in_sandbox is not None
        t0 = time.perf_counter()
        saved = self.locks / f"{_namespaced(key, namespace)}.txt"
        if saved.is_file():
            lock = saved.read_text()
            digest = _source_digest(lock, namespace)
            if self.path(digest).is_dir():
                packages = tuple(uv.pins(lock))
                report(Progress("resolved", list(packages), True))
                meta = await asyncio.to_thread(self.meta, digest)
                report(Progress("installed", reused=True, bytes=meta.bytes))
                text = f"layer {digest} (built from source in {namespace}) is installed already"
                ms = (time.perf_counter() - t0) * 1e3
                return Layer(digest, self.path(digest), packages, False, ms, text, meta.bytes)
        report(Progress("building"))
        t1 = time.perf_counter()
        build = await self.in_sandbox(namespace, reqs.text(), self.index.args())
        if build.failed:
            raise uv.failure(reqs, build.failed, build.message)
        async with self._staging_dir() as staging:
            await asyncio.to_thread(disk.unpack_build, build.archive, staging, self.max_bytes)
            lock = (staging / "lock.txt").read_text()
            digest = _source_digest(lock, namespace)
            packages = tuple(uv.pins(lock))
            text = (staging / "build.log").read_text()
            await self._publish(staging, digest, packages, lock, t0, keep_lock=False)
        disk.write_atomically(saved, lock)
        meta = await asyncio.to_thread(self.meta, digest)
        ms = round((time.perf_counter() - t1) * 1e3, 1)
        report(Progress("built", list(packages), bytes=meta.bytes, ms=ms))
        log_text = f"built from source in a sandbox of namespace {namespace}\n{text}"
        ms = (time.perf_counter() - t0) * 1e3
        return Layer(digest, self.path(digest), packages, True, ms, log_text, meta.bytes)

    async def ensure_installed(self, digest: str) -> None:
        """A stored revision's layer, installed again from its kept lock when it is missing
        (after a restart on a new disk, or when someone removed it): one stat when it is
        there."""
        if not digest or self.path(digest).is_dir():
            return
        saved = self.locks / f"{digest}.lock"
        if not saved.is_file():
            raise RequirementsError(
                f"layer {digest[:12]} is missing and its lock is not kept here; deploy the "
                "function again to rebuild it",
                code="layer_missing",
            )
        lock = saved.read_text()
        packages = tuple(uv.pins(lock))
        reqs = Requirements(f"the kept lock of layer {digest[:12]}", packages)
        async with self._one_at_a_time(f"layer {digest}"):
            if not self.path(digest).is_dir():
                log.warning("layer %s is missing: installing it again from its lock", digest)
                await self._install(reqs, lock, digest, packages, [], _ignore)

    def meta(self, digest: str) -> LayerMeta:
        return msgspec.json.decode((self.path(digest) / META).read_bytes(), type=LayerMeta)

    async def _lock(
        self, reqs: Requirements, key: str, log: list[str], report: Report
    ) -> tuple[str, bool]:
        """The lock of `reqs`, and whether it is one an earlier deploy made."""
        saved = self.locks / f"{key}.txt"
        if saved.is_file():
            log.append(f"the lock of these requirements is reused ({key[:12]}): not resolved again")
            return saved.read_text(), True
        with tempfile.TemporaryDirectory(prefix="ember-resolve-") as work:
            (Path(work) / "requirements.in").write_text(reqs.text())
            log.append(
                await self.uv.run(
                    reqs,
                    work,
                    "compile",
                    "requirements.in",
                    "--generate-hashes",
                    "--no-header",
                    "--no-annotate",
                    "--output-file",
                    "lock.txt",
                    heard=_downloads(report),
                )
            )
            lock = (Path(work) / "lock.txt").read_text()
        disk.write_atomically(saved, lock)
        return lock, False

    async def _install(
        self,
        reqs: Requirements,
        lock: str,
        digest: str,
        packages: tuple[str, ...],
        log: list[str],
        report: Report,
    ) -> None:
        async with self._staging_dir() as staging:
            t0 = time.perf_counter()
            staging.mkdir(parents=True)
            (staging / "lock.txt").write_text(lock)
            said = await self.uv.run(
                reqs,
                str(staging),
                "install",
                "--target",
                SITE,
                "--no-deps",
                "--require-hashes",
                "--compile-bytecode",
                "-r",
                "lock.txt",
                heard=_downloads(report),
            )
            log.append(said)
            await self._publish(staging, digest, packages, lock, t0, keep_lock=True)

    @contextlib.asynccontextmanager
    async def _staging_dir(self) -> AsyncIterator[Path]:
        """A fresh path under the layers for one build: kept from clean-ups while the build
        runs, and removed after it unless it was renamed into place."""
        staging = self.root / f"{STAGING}{secrets.token_hex(8)}"
        self._staging.add(staging.name)
        try:
            yield staging
        finally:
            self._staging.discard(staging.name)
            if staging.exists():
                await asyncio.to_thread(shutil.rmtree, staging, True)

    async def _publish(
        self,
        staging: Path,
        digest: str,
        packages: tuple[str, ...],
        lock: str,
        t0: float,
        keep_lock: bool,
    ) -> None:
        """Seal an installed tree (`staging/site`), check its size, describe it and rename it
        into place. `keep_lock`: the lock is kept to install it again (not for a layer built
        from source: that takes the namespace's sandbox)."""
        size = await asyncio.to_thread(disk.seal, staging / SITE)
        if size > self.max_bytes:
            raise RequirementsError(
                f"the installed requirements take {size // (1024 * 1024)} MB, over the "
                f"limit of {self.max_bytes // (1024 * 1024)} MB per layer (ember up "
                "--max-layer-mb); require fewer or smaller packages",
                code="layer_too_large",
            )
        meta = LayerMeta(
            digest=digest,
            packages=list(packages),
            bytes=size,
            build_ms=round((time.perf_counter() - t0) * 1e3, 1),
            created_at=time.time(),
            platform=_platform(),
        )
        (staging / META).write_bytes(msgspec.json.format(msgspec.json.encode(meta)) + b"\n")
        staging.chmod(0o755)
        if keep_lock:
            disk.write_atomically(self.locks / f"{digest}.lock", lock)  # to install it again
        try:
            staging.rename(self.path(digest))
        except OSError:  # another input with the same lock was installed meanwhile
            if not (self.path(digest) / META).is_file():
                raise

    def installed(self) -> list[LayerMeta]:
        """What `layer.json` says of every installed layer (blocking: a worker thread)."""
        out = []
        for entry in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if len(entry.name) == 64 and (entry / META).is_file():
                out.append(msgspec.json.decode((entry / META).read_bytes(), type=LayerMeta))
        return out

    def unused(self, used: set[str]) -> list[Path]:
        """Layer directories no kept revision uses, and staging left by an interrupted build:
        what a clean-up may remove."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            name = entry.name
            if name in self._staging or name in self._pinned:  # a build or deploy under way
                continue
            if name.startswith((STAGING, TRASH)) or (len(name) == 64 and name not in used):
                out.append(entry)
        return out


def _namespaced(key: str, namespace: str) -> str:
    return hashlib.sha256(f"{key}\0source-built-in\0{namespace}".encode()).hexdigest()


def _source_digest(lock: str, namespace: str) -> str:
    return hashlib.sha256(
        f"{_platform()}\0{lock}\0source-built-in\0{namespace}".encode()
    ).hexdigest()


def _input_key(index: uv.PackageIndex, reqs: Requirements) -> str:
    """What a resolution depends on: the requirements, where packages come from, and the
    interpreter and platform."""
    return hashlib.sha256(json.dumps([_platform(), index.args(), reqs.lines]).encode()).hexdigest()
