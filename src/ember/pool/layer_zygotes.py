"""Layer zygotes as the server holds them: one per function and sandbox, its layer's heavy
packages imported once; each new revision's function zygote forks from it.

A function zygote that forks from a layer zygote shares its process tree's sandbox (pid
namespace, mounts, `/tmp`, secrets, network: see `ember.runtime.layer_zygote`), so a layer
zygote is keyed by everything that sandbox holds: the namespace, the function, its layer and
a digest of its environment, secrets and limits. Two functions, and so two namespaces, never
share one; a function whose secrets or environment change gets a new one (the old one, now
unused, goes at the next keep-alive step).

They are extra: a start that cannot use one (none could be made within the node's memory
budget, the namespace's quota or `--layer-zygotes`, or it failed) starts its zygote the usual
way. Each counts against the memory budget (its measured use, at `memory:` until measured) and
its namespace's quota (at `memory:`), and is evicted least recently used first, only while
no function zygote forked from it runs.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from ember.errors import EmberError, PlatformError
from ember.pool.budget import KB, Eviction
from ember.pool.channel import AsyncChannel
from ember.pool.target import Target
from ember.pool.zygote import shut_down
from ember.wire.messages import (
    ForkZygote,
    SandboxPlan,
    ZygoteFailed,
    ZygoteMessage,
    ZygoteReady,
    ZygoteStarted,
)

log = logging.getLogger("ember.pool")
LayerKey = tuple[str, str, str, str]  # namespace, function, layer directory, sandbox digest
BACKOFF = 60.0  # seconds without a layer zygote for a key after one failed
MAX_PARSED = 256 * 1024  # bytes of a handler's module the server reads for its imports


def layer_key(target: Target, env: dict[str, str], plan: SandboxPlan | None) -> LayerKey:
    """What a layer zygote's process tree holds that its function zygotes inherit: the whole
    sandbox plan but its cgroups (uid, secrets, `/tmp`, binds, hostname, …), the environment,
    and the limits and preload list of the function."""
    spec = target.spec
    held = (
        env,
        msgspec.structs.replace(plan, cgroups=[]) if plan is not None else None,
        spec.network,
        spec.tmp,
        spec.memory,
        spec.pids,
        spec.cpu,
        sorted(spec.preload),
    )
    digest = hashlib.sha256(msgspec.msgpack.encode(held, order="deterministic")).hexdigest()
    return (target.namespace, target.function, target.layer_dir, digest)


def _top_level(layer: Path) -> set[str]:
    """Importable top-level names a layer provides: packages and modules."""
    names: set[str] = set()
    for entry in layer.iterdir():
        if entry.is_dir() and "." not in entry.name and entry.name != "bin":
            names.add(entry.name)
        elif entry.suffix in (".py", ".so", ".pyd"):
            names.add(entry.name.partition(".")[0])
    return names


def _imports(node: ast.AST) -> list[str]:
    """Top-level names the module imports, in order, outside functions (what runs at import)."""
    found: list[str] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(child, ast.Import):
            found += [alias.name.partition(".")[0] for alias in child.names]
        elif isinstance(child, ast.ImportFrom):
            if child.module and not child.level:
                found.append(child.module.partition(".")[0])
        else:
            found += _imports(child)
    return list(dict.fromkeys(found))


def preload_names(target: Target) -> list[str]:
    """What a layer zygote imports: the layer's packages the handler's module imports, then
    the function's `preload:` list. Reads files: on a worker thread. A module that cannot be
    read or parsed (its own import will say why), or over MAX_PARSED, gives only the list."""
    spec = target.spec
    base = Path(target.code_dir, spec.source, *spec.module.split("."))
    names: list[str] = []
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        try:
            if path.stat().st_size > MAX_PARSED:
                break  # the server's time is not the tenant's: `preload:` alone
            found = _imports(ast.parse(path.read_bytes(), str(path)))
            provided = _top_level(Path(target.layer_dir))
        except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        names = [name for name in found if name in provided]
        break
    return list(dict.fromkeys([*names, *spec.preload]))


class LayerZygote:
    """The server's handle on one layer zygote."""

    def __init__(self, sock: socket.socket, key: LayerKey, target: Target) -> None:
        self.key = key
        self.namespace = target.namespace
        self.function = target.qualified
        self.layer = Path(target.layer_dir).parent.name  # its digest
        self.label = f"{target.qualified} (layer {self.layer[:12]})"
        self.preload: list[str] = []  # what it imports
        self.memory_mb = target.spec.memory
        self.ready: asyncio.Future[ZygoteReady] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.pid = 0
        self.pidfd = -1
        self.dead = False
        self.children = 0  # function zygotes forked from it, alive
        self.pending = 0  # starts that chose it and have not forked from it yet
        self.forks = 0  # function zygotes forked from it, ever
        self.last_used = time.monotonic()
        self.measured_kb = 0
        self.cgroup_dir = ""
        # Code directories mounted in its sandbox (or being mounted), by name.
        self.shown: dict[str, asyncio.Future[None]] = {}
        self.told = False  # its import's warnings and output are in the function's log
        self.on_close: Callable[[LayerZygote], None] | None = None
        self.channel: AsyncChannel[ZygoteMessage] = AsyncChannel(
            sock, ZygoteMessage, self._on_message, self._on_close
        )

    def _on_message(self, msg: ZygoteMessage, sender: int) -> None:
        if isinstance(msg, ZygoteStarted):
            if self.pid:  # only its first report, sent before any tenant code ran, counts
                return
            if not sender:  # a pid it cannot prove is never signalled
                self._fail(PlatformError(f"the layer zygote of {self.label} sent no credentials"))
                self.channel.close()
                return
            try:  # it, for good: the code is mounted and the kill sent through this
                self.pidfd = os.pidfd_open(sender)
            except OSError:
                self._fail(PlatformError(f"the layer zygote of {self.label} is gone"))
                self.channel.close()
                return
            self.pid = sender
        elif isinstance(msg, ZygoteReady):
            if not self.ready.done():
                self.ready.set_result(msg)
        elif isinstance(msg, ZygoteFailed):
            self._fail(PlatformError(f"the layer zygote of {self.label} failed: {msg.message}"))
            self.channel.close()

    def _fail(self, exc: EmberError) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)

    def _on_close(self) -> None:
        self.dead = True
        self._fail(PlatformError(f"the layer zygote of {self.label} exited"))
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.on_close is not None:
            self.on_close(self)

    @property
    def in_use(self) -> bool:
        """A function zygote forked from it runs, or a start is about to fork one."""
        return bool(self.children or self.pending)

    @property
    def usable(self) -> bool:
        return not self.dead and self.ready.done() and not self.ready.exception()

    def fork(self, code: str) -> socket.socket:
        """A function zygote forked from it, waiting for its spec on the returned socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:  # the channel owns `theirs` from here and closes it once the fd is sent
            self.channel.send(ForkZygote(code=code), theirs)
        except OSError as exc:
            ours.close()
            raise PlatformError(f"the layer zygote of {self.label} is gone: {exc}") from exc
        self.children += 1
        self.forks += 1
        self.last_used = time.monotonic()
        return ours

    def child_gone(self) -> None:
        self.children -= 1
        self.last_used = time.monotonic()

    def stop(self) -> None:
        if not self.ready.done() and self.pidfd >= 0:  # stuck importing: it cannot listen
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        shut_down(self.channel)


class LayerZygotes:
    """Every layer zygote of the node: found by key, kept within `most`, counted by the memory
    budget (an `Occupant`) and measured (a `Measurable`) as one."""

    label = "layer zygotes"
    within_min = False
    zygote_alive = True  # what it starts counts at once (budget.make_room never asks for it)

    def __init__(
        self,
        most: int,
        keepalive: float,
        changed: Callable[[], None],
        measure: Callable[[], None] = lambda: None,
    ) -> None:
        self.most = most
        self.keepalive = keepalive
        self._changed = changed  # what the budget counts of them may have changed
        self._measure = measure  # one is ready: measure them soon
        self.by_key: dict[LayerKey, LayerZygote] = {}
        self.memory_mb = 0  # of the one being asked about (budget messages only)
        self._failed: dict[LayerKey, float] = {}  # when one last failed (the loop's clock)

    def failed(self, key: LayerKey, now: float) -> None:
        """One failed (its import, its sandbox, showing code to it): its function's zygotes
        start the usual way for BACKOFF seconds, instead of paying for another try each."""
        self._failed[key] = now
        for old in [k for k, when in self._failed.items() if now - when > BACKOFF]:
            del self._failed[old]

    def backing_off(self, key: LayerKey, now: float) -> bool:
        when = self._failed.get(key)
        return when is not None and now - when <= BACKOFF

    def get(self, key: LayerKey) -> LayerZygote | None:
        lz = self.by_key.get(key)
        return None if lz is None or lz.dead else lz

    def add(self, lz: LayerZygote, on_close: Callable[[LayerZygote], None]) -> None:
        def closed(gone: LayerZygote) -> None:
            self._forget(gone)
            on_close(gone)

        lz.on_close = closed
        lz.ready.add_done_callback(lambda _: self._measure())
        self.by_key[lz.key] = lz
        self._changed()

    def _forget(self, lz: LayerZygote) -> None:
        if self.by_key.get(lz.key) is lz:
            del self.by_key[lz.key]
            self._changed()

    def make_room(self, starting: int = 0) -> bool:
        """Room for one more beside those running and `starting`, once the least recently
        used idle one is gone if needed."""
        if len(self.by_key) + starting < self.most:
            return True
        idle = [lz for lz in self.by_key.values() if lz.usable and not lz.in_use]
        if not idle:  # in use, or starting for someone
            return False
        self.evict(min(idle, key=lambda lz: lz.last_used))
        return len(self.by_key) + starting < self.most

    def evict(self, lz: LayerZygote) -> bool:
        """Stop it unless a function zygote uses it (or is about to); it counts no more."""
        if lz.in_use:
            return False
        log.info("layer zygote of %s stopped", lz.label)
        self._forget(lz)
        lz.stop()
        return True

    def evict_idle(self, namespace: str) -> int:
        """Stop every idle one of `namespace` (its quota needs the room); MB they counted."""
        freed = 0
        for lz in list(self.by_key.values()):
            if lz.namespace == namespace and lz.ready.done() and self.evict(lz):
                freed += lz.memory_mb
        return freed

    def declared_mb(self, namespace: str) -> int:
        """What its namespace's quota counts of them: each at its function's `memory:`."""
        return sum(lz.memory_mb for lz in self.by_key.values() if lz.namespace == namespace)

    def tick(self, now: float, live: Callable[[str], bool]) -> None:
        """Stop those no function zygote uses whose function is gone, or that no function
        zygote used for `keepalive` seconds (`--layer-zygote-keepalive`)."""
        for lz in list(self.by_key.values()):
            if lz.in_use or not lz.ready.done():
                continue
            if not live(lz.function) or now - lz.last_used > self.keepalive:
                self.evict(lz)

    def stop_all(self) -> None:
        for lz in list(self.by_key.values()):
            lz.stop()

    # ---- the memory budget's Occupant ----
    def counted_kb(self) -> int:
        return sum(lz.measured_kb or lz.memory_mb * KB for lz in self.by_key.values())

    def reserve_kb(self) -> int:
        return 0

    def evictions(self, asking: bool) -> list[Eviction]:
        return [
            Eviction(
                lz.last_used,
                True,
                lz.measured_kb or lz.memory_mb * KB,
                f"the layer zygote of {lz.label}",
                functools.partial(self.evict, lz),
            )
            for lz in self.by_key.values()
            if not lz.in_use and lz.usable
        ]

    # ---- the measurer's Measurable ----
    def measurable(self) -> list[tuple[object, int]]:
        return [(lz, lz.pid) for lz in self.by_key.values() if lz.usable and lz.pid]

    def measured(self, values: list[tuple[object, int]]) -> bool:
        for lz, kb in values:
            if isinstance(lz, LayerZygote):
                lz.measured_kb = kb
        self._changed()
        return bool(self.by_key)
