"""Layers: a function's requirements resolved into a lock and installed once, read-only, under
EMBER_HOME/layers/<lock digest>, shared by every revision whose lock is the same.

uv does the work (`uv pip compile` resolves, `uv pip install --target` installs from its
cache, hard-linking files where it can: which is why a layer is never writable). Both run as
subprocesses with the operator's index settings, a cache under EMBER_HOME, no configuration
files read (`--no-config`, and a working directory of their own: never the function's), and
wheels only: a package that would have to be built from source runs its build scripts, which
Ember does not do outside a sandbox, so it is refused with the installer's message.

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
import os
import re
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

from ember.errors import RequirementsError, TooLarge, UserError
from ember.layers.requirements import Requirements

log = logging.getLogger("ember.layers")

STAGING = ".tmp-"
TRASH = ".trash-"
SITE = "site"  # the installed packages inside a layer directory: what goes on sys.path
META = "layer.json"
MAX_MESSAGE = 4000  # characters of the installer's output in an error
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def uv_binary() -> str:
    """The uv executable of Ember's own environment (the `uv` wheel)."""
    from uv import find_uv_bin

    return find_uv_bin()


class Progress(msgspec.Struct, frozen=True, omit_defaults=True):
    """One step of a build, as `ember deploy` shows it while it runs."""

    phase: str  # resolving | resolved | installing | installed; from source: building | built
    packages: list[str] = []  # resolved: "name==version"
    reused: bool = False  # resolved: the lock of an earlier deploy; installed: the layer was there
    bytes: int = 0  # installed: the layer's size
    ms: float = 0.0  # time the step took


Report = Callable[[Progress], None]


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


@dataclass(frozen=True, slots=True)
class PackageIndex:
    """Where builds download from: the operator's settings of `ember up`."""

    index_url: str = ""
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False  # only find_links
    offline: bool = False  # only uv's cache (and find_links)

    def args(self) -> list[str]:
        out: list[str] = []
        if self.index_url:
            out += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            out += ["--extra-index-url", url]
        for link in self.find_links:
            out += ["--find-links", link]
        if self.no_index:
            out.append("--no-index")
        if self.offline:
            out.append("--offline")
        return out


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
        index: PackageIndex,
        timeout: float,
        max_bytes: int,
        cache: Path | None = None,
    ) -> None:
        self.root = root
        self.index = index
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.cache = cache or root / ".cache"  # uv's cache: wheels downloaded once
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
                if not (namespace and self.in_sandbox and _needs_building(exc)):
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
        lock, reused = await self._lock(reqs, key, log)
        digest = hashlib.sha256(f"{_platform()}\0{lock}".encode()).hexdigest()
        packages = tuple(_pins(lock))
        t1 = time.perf_counter()
        report(Progress("resolved", list(packages), reused, ms=round((t1 - t0) * 1e3, 1)))
        built = not self.path(digest).is_dir()
        if built:
            report(Progress("installing", list(packages)))
            await self._install(reqs, lock, digest, packages, log)
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
                packages = tuple(_pins(lock))
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
            raise _failure(reqs, build.failed, build.message)
        staging = self.root / f"{STAGING}{secrets.token_hex(8)}"
        self._staging.add(staging.name)
        try:
            await asyncio.to_thread(_unpack_build, build.archive, staging, self.max_bytes)
            lock = (staging / "lock.txt").read_text()
            digest = _source_digest(lock, namespace)
            packages = tuple(_pins(lock))
            text = (staging / "build.log").read_text()
            await self._publish(staging, digest, packages, lock, t0, keep_lock=False)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise
        finally:
            self._staging.discard(staging.name)
        _write_atomically(saved, lock)
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
        packages = tuple(_pins(lock))
        reqs = Requirements(f"the kept lock of layer {digest[:12]}", packages)
        async with self._one_at_a_time(f"layer {digest}"):
            if not self.path(digest).is_dir():
                log.warning("layer %s is missing: installing it again from its lock", digest)
                await self._install(reqs, lock, digest, packages, [])

    def meta(self, digest: str) -> LayerMeta:
        return msgspec.json.decode((self.path(digest) / META).read_bytes(), type=LayerMeta)

    async def _lock(self, reqs: Requirements, key: str, log: list[str]) -> tuple[str, bool]:
        """The lock of `reqs`, and whether it is one an earlier deploy made."""
        saved = self.locks / f"{key}.txt"
        if saved.is_file():
            log.append(f"the lock of these requirements is reused ({key[:12]}): not resolved again")
            return saved.read_text(), True
        with tempfile.TemporaryDirectory(prefix="ember-resolve-") as work:
            (Path(work) / "requirements.in").write_text(reqs.text())
            log.append(
                await self._uv(
                    reqs,
                    work,
                    "compile",
                    "requirements.in",
                    "--generate-hashes",
                    "--no-header",
                    "--no-annotate",
                    "--output-file",
                    "lock.txt",
                )
            )
            lock = (Path(work) / "lock.txt").read_text()
        _write_atomically(saved, lock)
        return lock, False

    async def _install(
        self, reqs: Requirements, lock: str, digest: str, packages: tuple[str, ...], log: list[str]
    ) -> None:
        staging = self.root / f"{STAGING}{secrets.token_hex(8)}"
        staging.mkdir(parents=True)
        self._staging.add(staging.name)
        try:
            t0 = time.perf_counter()
            (staging / "lock.txt").write_text(lock)
            said = await self._uv(
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
            )
            log.append(said)
            await self._publish(staging, digest, packages, lock, t0, keep_lock=True)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staging, True)
            raise
        finally:
            self._staging.discard(staging.name)

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
        size = await asyncio.to_thread(_seal, staging / SITE)
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
            _write_atomically(self.locks / f"{digest}.lock", lock)  # to install it again
        try:
            staging.rename(self.path(digest))
        except OSError:  # another input with the same lock was installed meanwhile
            if not (self.path(digest) / META).is_file():
                raise
            await asyncio.to_thread(shutil.rmtree, staging, True)

    async def _uv(self, reqs: Requirements, cwd: str, command: str, *args: str) -> str:
        """Run `uv pip COMMAND`: what it said (its summary lines), or its message as a
        `RequirementsError` when it fails."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": cwd,
            "UV_CACHE_DIR": str(self.cache),
            "UV_NO_PROGRESS": "1",
            "NO_COLOR": "1",
        }
        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
            if name in os.environ:
                env[name] = os.environ[name]
        proc = await asyncio.create_subprocess_exec(
            uv_binary(),
            "pip",
            command,
            "--no-config",
            "--python",
            sys.executable,
            "--only-binary",
            ":all:",
            *self.index.args(),
            *args,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RequirementsError(
                f"building the requirements ({reqs.source}) took over {self.timeout:g} s, the "
                "limit (ember up --build-timeout)",
                code="build_timeout",
            ) from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        said = _ANSI.sub("", err.decode(errors="replace")).strip()
        if proc.returncode != 0:
            raise _failure(reqs, command, said)
        return f"$ uv pip {command}\n{said}"

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


def _needs_building(exc: RequirementsError) -> bool:
    """uv refused because a package has no wheel: only building it from source would do."""
    said = exc.message.lower()
    return "building from source is disabled" in said or "no wheels" in said


def _namespaced(key: str, namespace: str) -> str:
    return hashlib.sha256(f"{key}\0source-built-in\0{namespace}".encode()).hexdigest()


def _source_digest(lock: str, namespace: str) -> str:
    return hashlib.sha256(
        f"{_platform()}\0{lock}\0source-built-in\0{namespace}".encode()
    ).hexdigest()


def _unpack_build(archive: bytes, staging: Path, max_bytes: int) -> None:
    """The sandbox's answer, unpacked as carefully as a bundle: files and directories only,
    within the layer's size limit."""
    from ember import bundle

    try:
        bundle.unpack(archive, staging, max_unpacked_bytes=max_bytes * 2, max_files=500_000)
    except (UserError, TooLarge) as exc:
        raise RequirementsError(
            f"the sandboxed build answered with an archive Ember cannot take: {exc.message}",
            code="build_failed",
        ) from None
    for name in ("lock.txt", "build.log", SITE):
        if not (staging / name).exists():
            raise RequirementsError(
                f"the sandboxed build's archive has no {name}", code="build_failed"
            )


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{STAGING}{secrets.token_hex(8)}")
    tmp.write_text(text)
    tmp.rename(path)


def _input_key(index: PackageIndex, reqs: Requirements) -> str:
    """What a resolution depends on: the requirements, where packages come from, and the
    interpreter and platform."""
    return hashlib.sha256(json.dumps([_platform(), index.args(), reqs.lines]).encode()).hexdigest()


def _pins(lock: str) -> list[str]:
    return [
        line.split(" ", 1)[0].rstrip("\\").strip()
        for line in lock.splitlines()
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line
    ]


def _failure(reqs: Requirements, command: str, message: str) -> RequirementsError:
    """The installer's message, with the requirement line it is about when one is named."""
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + " …"
    lowered = message.lower()
    culprit = next(
        (
            line
            for line in reqs.lines
            if re.search(rf"\b{re.escape(_name(line).lower())}\b", lowered) is not None
        ),
        None,
    )
    where = f" (line {reqs.lines.index(culprit) + 1}: {culprit})" if culprit else ""
    what = "resolving" if command == "compile" else "installing"
    hint = ""
    if any(
        sign in lowered
        for sign in ("no wheels", "only-binary", "building from source", "source distribution")
    ):
        hint = (
            "; this server installs wheels only (ember up --no-source-builds): pick a version "
            "with a wheel for this platform"
        )
    return RequirementsError(
        f"{what} {reqs.source} failed{where}: {message}{hint}",
        code="requirements_unresolvable" if command == "compile" else "build_failed",
    )


def _name(line: str) -> str:
    return re.split(r"[\s\[<>=!~;@(]", line, maxsplit=1)[0]


def _seal(site: Path) -> int:
    """Take the write bits off every installed file (uv hard-links files from its cache: a
    write through one layer would change every copy and the cache); return the tree's size
    in bytes. Sandboxes also see the layer through a read-only mount, as another uid."""
    total = 0
    for dirpath, _, filenames in os.walk(site):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not os.path.islink(path):
                os.chmod(path, st.st_mode & 0o555)
                total += st.st_size
    return total
