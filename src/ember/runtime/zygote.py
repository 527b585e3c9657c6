"""A function zygote: forked from the root, imports the user's module once, forks instances.

It is a plain blocking loop (no event loop, no threads), so forking it is safe and cheap.
"""

from __future__ import annotations

import gc
import importlib
import io
import os
import select
import signal
import site
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ember.runtime import forking, instance, layer_zygote, limits, sandbox, stack
from ember.runtime.channel import Channel, decoder_for
from ember.wire.messages import (
    Forked,
    ForkFailed,
    ForkInstance,
    InstanceExited,
    Shutdown,
    SpareCommand,
    SpareReady,
    SpawnBlank,
    SpawnLayerZygote,
    SpawnZygote,
    ZygoteCommand,
    ZygoteFailed,
    ZygoteReady,
    ZygoteStarted,
)

MAX_TEXT = 48 * 1024  # bytes of output or traceback in one control message (a packet)
decoder_for(ZygoteCommand)  # built in the root zygote, before any fork
decoder_for(SpareCommand)


def add_layer(layer: str, at: int) -> None:
    """A layer's packages at `at` on sys.path: after the function's own code (1), before
    anything else."""
    sys.path.insert(at, layer)
    site.addsitedir(layer)  # its .pth files (the directory is on sys.path already)


def _prepare(spec: SpawnZygote, inside: str) -> None:
    """`inside`: where the code is when forked from a layer zygote, whose sandbox, network and
    layer this zygote has already."""
    if spec.network == "none" and spec.sandbox is None and not inside:  # else done already
        limits.isolate_network()  # before any user code: nothing it opens can reach out
    code_dir = inside or (spec.code_dir if spec.sandbox is None else sandbox.CODE_DIR)
    workdir = os.path.join(code_dir, spec.source)
    os.chdir(workdir)
    sys.path.insert(0, workdir)
    if spec.layer_dir and not inside:
        add_layer(spec.layer_dir if spec.sandbox is None else sandbox.LAYER_DIR, 1)
    stack.set_code_dir(code_dir)
    os.environ.update(spec.env)
    os.environ.update(
        {
            "EMBER_FUNCTION": spec.function,
            "EMBER_NAMESPACE": spec.namespace,
            "EMBER_REVISION": str(spec.number),
            "EMBER_MEMORY_MB": str(spec.memory_mb),
        }
    )


def _load(spec: SpawnZygote) -> Callable[..., Any]:
    module = importlib.import_module(spec.module)
    handler = getattr(module, spec.attribute, None)
    if not callable(handler):
        raise AttributeError(
            f"module '{spec.module}' has no function '{spec.attribute}'; define "
            f"def {spec.attribute}(req, ctx) or set handler: in ember.yaml"
        )
    return handler  # type: ignore[no-any-return]


def _user_traceback(exc: BaseException) -> str:
    return "".join(stack.format_exception(exc, skip_ember=True))


class Zygote:
    def __init__(
        self,
        channel: Channel[ZygoteCommand],
        spec: SpawnZygote,
        handler: Callable[..., Any],
        prepared: instance.Prepared,
        plain: bool,
    ) -> None:
        self.channel = channel
        self.spec = spec
        self.handler = handler
        self.prepared = prepared
        self.plain = plain  # fork without CPython's after-fork work (`forking`)
        self.children: set[int] = set()
        # The instances' parent: 1 in a sandbox's pid namespace of its own; forked from a
        # layer zygote, a child subreaper in the layer zygote's.
        self.pid = os.getpid()

    def fork(self, cmd: ForkInstance, fd: int) -> None:
        try:
            pid = forking.fork(self.plain)
        except OSError as exc:  # EAGAIN, ENOMEM: this instance fails, the zygote lives on
            os.close(fd)
            self.channel.send(ForkFailed(instance=cmd.instance, error=str(exc)))
            return
        if pid == 0:
            try:
                self._become_instance(cmd, fd, self.pid)
            finally:
                os._exit(1)  # never back into the zygote's loop
        os.close(fd)
        self.children.add(pid)

    def _become_instance(self, cmd: ForkInstance, fd: int, zygote: int) -> None:
        # The instance announces itself: the server reads its host pid from the packet's
        # credentials, as pids in here belong to the sandbox's pid namespace.
        self.channel.send(Forked(instance=cmd.instance, pid=os.getpid()))
        self.channel.sock.detach()  # closed below with every other inherited fd
        limits.close_fds_except(fd)
        limits.die_with_parent(zygote)
        limits.default_signals()
        if cmd.rlimit_as:  # without cgroups; with them the server moves us (off this path)
            limits.limit_address_space(cmd.rlimit_as)
        instance.run(fd, self.handler, self.spec, self.prepared)

    def reap(self) -> None:
        while True:  # orphans of instances are reparented to us too (pid 1, or subreaper)
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                self.channel.send(InstanceExited(pid=pid, status=code))

    def on_command(self) -> bool:
        got = self.channel.recv()
        if got is None or isinstance(got[0], Shutdown):
            return False
        cmd, fds = got
        if isinstance(cmd, ForkInstance) and fds:
            self.fork(cmd, fds[0])
        return True

    def serve(self) -> None:
        """Fork on command and reap on SIGCHLD until told to stop (`serve_commands`)."""
        serve_commands(self.channel.sock.fileno(), self.on_command, self.reap)
        # Its instances, and what they left behind (adopted as a subreaper; as pid 1 of its
        # own pid namespace, the kernel ends those with it anyway).
        for pid in {*self.children, *limits.own_children()}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def serve_commands(
    commands: int, on_command: Callable[[], bool], on_child: Callable[[], None]
) -> None:
    """A zygote's loop: `on_command` when its channel (`commands`) is readable, until it
    returns False; `on_child` after a SIGCHLD. A bare poll(), not `selectors`: whatever the
    zygote does after a fork writes pages its new child then keeps as private copies."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    poller = select.poll()
    poller.register(commands, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd != commands:
                os.read(wake_r, 4096)
                on_child()
            elif not on_command():
                return


def _clip(text: str, limit: int = MAX_TEXT) -> str:
    """At most `limit` bytes of UTF-8, keeping the end (where tracebacks say what happened)."""
    data = text.encode("utf-8", "replace")
    return text if len(data) <= limit else data[-limit:].decode("utf-8", "ignore")


class InitTimeout(Exception):
    pass


def alarm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # swallowing the exception will not help:
    signal.setitimer(signal.ITIMER_REAL, 5.0)  # the next alarm ends the process
    raise InitTimeout(
        "the module did not finish importing in time; move slow work out of "
        "module level or raise init_timeout"
    )


def fail(channel: Channel[Any], exc: BaseException, output: str = "") -> None:
    """Report a failed import (the module's traceback, its output) and exit."""
    channel.send(
        ZygoteFailed(
            error_type=type(exc).__name__,
            message=_clip(str(exc), 4096),
            traceback=_clip(_user_traceback(exc)),
            output=_clip(output),
        )
    )
    os._exit(1)


def _import(
    spec: SpawnZygote, channel: Channel[ZygoteCommand], inside: str
) -> tuple[Callable[..., Any], str, int]:
    """Import the user's module with its output captured and a deadline; report failure.
    Also: how many at-fork hooks the import registered (`forking.ForkHooks`)."""
    output = io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = output
    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, spec.init_timeout)
    try:
        with forking.ForkHooks() as hooks:
            _prepare(spec, inside)
            handler = _load(spec)
    except BaseException as exc:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout, sys.stderr = saved
        fail(channel, exc, output.getvalue())
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    sys.stdout, sys.stderr = saved
    return handler, output.getvalue(), hooks.foreign


def thread_warnings() -> list[str]:
    if threading.active_count() > 1:
        return [
            f"the module started {threading.active_count() - 1} thread(s) at import; threads do "
            "not survive fork: start them in an @ember.on_fork hook instead"
        ]
    return []


def sandbox_failed(exc: OSError, channel: Channel[Any]) -> None:
    channel.send(
        ZygoteFailed(
            error_type=type(exc).__name__,
            message=_clip(str(exc), 4096),
            traceback="",
            platform=True,
        )
    )
    os._exit(1)


def prologue(fd: int, parent: int) -> socket.socket:
    limits.close_fds_except(fd)
    limits.die_with_parent(parent)
    limits.default_signals()
    sys.dont_write_bytecode = True  # the revision's code directory is shared and read-only
    return socket.socket(fileno=fd)


def run(cmd: SpawnBlank, fd: int, parent: int) -> None:
    """Entry point in the child of the root zygote; never returns.

    A spare (`cmd.split`) enters its pid namespace and cgroups at once, ahead of need: placing a
    process in a cgroup can wait out an RCU grace period (5-20 ms), which a specialize start
    then skips. Then it waits for the function it will become.
    """
    sock = prologue(fd, parent)
    channel: Channel[ZygoteCommand] = Channel(sock, ZygoteCommand)
    ready_r = -1
    if cmd.split:
        try:
            ready_r = sandbox.split(cmd.cgroups)
            if cmd.spare:  # the server renames these cgroups once told: be in them first
                sandbox.placed(ready_r)
                ready_r = -1
        except OSError as exc:
            sandbox_failed(exc, channel)
        if cmd.spare:
            channel.send(SpareReady())
    waiting: Channel[SpareCommand] = Channel(sock, SpareCommand)
    got = waiting.recv()
    if got is None or isinstance(got[0], Shutdown):
        os._exit(0)  # not needed after all (the server stopped, or the spare was retired)
    spec = got[0]
    plan = spec.sandbox
    if plan is not None and not cmd.split:
        try:
            ready_r = sandbox.split(plan.cgroups, plan if plan.userns else None)
        except OSError as exc:
            sandbox_failed(exc, channel)
    if isinstance(spec, SpawnLayerZygote):
        layer_zygote.become(spec, sock, ready_r)
    else:
        become(spec, channel, ready_r)


def ready_message(
    started: float, anon_before: int, warnings: list[str], output: str
) -> ZygoteReady:
    return ZygoteReady(
        pid=os.getpid(),
        import_ms=(time.perf_counter() - started) * 1000,
        import_anon_kb=max(0, limits.anon_kb() - anon_before),
        warnings=warnings,
        output=_clip(output),
    )


def become(
    spec: SpawnZygote,
    channel: Channel[ZygoteCommand],
    ready_r: int,
    inside: str = "",
    hooks: int = 0,
) -> None:
    """Finish the sandbox (unless forked `inside` a layer zygote's), import the module, serve
    forks; never returns. `hooks`: at-fork hooks registered before it (by a layer zygote's
    imports), which plain forks would skip."""
    if spec.sandbox is not None and not inside:
        try:
            sandbox.finish(
                spec.sandbox, spec.code_dir, spec.network == "none", ready_r, spec.layer_dir
            )
        except OSError as exc:
            sandbox_failed(exc, channel)
    if inside:  # not pid 1: what its instances leave behind comes to it, and goes with it
        limits.become_subreaper()
    channel.send(ZygoteStarted(pid=os.getpid()))
    started = time.perf_counter()
    anon_before = limits.anon_kb()
    handler, output, foreign_hooks = _import(spec, channel, inside)
    # Young generations only: a full collection after importing numpy + pandas walks ~50,000
    # objects for ~13 ms and finds nothing. Freezing keeps instances from touching (and so
    # copying) the zygote's pages when they collect.
    prepared = instance.Prepared(spec, handler)
    gc.collect(1)
    gc.freeze()
    channel.send(ready_message(started, anon_before, thread_warnings(), output))
    plain = forking.single_threaded() and not (foreign_hooks or hooks)
    try:
        Zygote(channel, spec, handler, prepared, plain).serve()
    finally:
        os._exit(0)
