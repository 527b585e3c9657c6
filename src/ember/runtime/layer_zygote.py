"""A layer zygote: a function's sandbox with its layer's heavy packages imported once, from
which each new revision's function zygote forks and imports only its own code.

A zygote-to-be (a fork of the root zygote) becomes one when it is sent `SpawnLayerZygote`
instead of `SpawnZygote`. It enters the sandbox as a function zygote would (`sandbox.py`:
its pid namespace, its root with the layer at `/layer`, the function's `/tmp` and secrets,
the tenant's uid, seccomp), except that `/code` is an empty directory: each revision's code
is mounted below it as `/code/NAME` from outside, by the root zygote (`code_mount.py`). Then
it imports `preload` (the layer's packages the handler's module imports, or the function's
`preload:` list) with the function's environment, freezes its heap and waits.

On `ForkZygote` it forks: the child is a function zygote that already holds those packages;
it waits for its `SpawnZygote` on the channel that came with the command and goes on as any
zygote does (`zygote.become`), without entering a sandbox again: it is in one. Everything a
sandbox gives per process tree (pid namespace, mounts, `/tmp`, secrets, network) is the layer
zygote's, so the server keeps one per function (and per environment, secrets and limits),
never one per namespace or layer alone: two functions never share a sandbox.
"""

from __future__ import annotations

import gc
import importlib
import io
import os
import signal
import socket
import sys
import time

from ember.runtime import forking, limits, sandbox, zygote
from ember.runtime.channel import Channel, decoder_for
from ember.wire.messages import (
    ForkZygote,
    LayerCommand,
    Shutdown,
    SpareCommand,
    SpawnLayerZygote,
    SpawnZygote,
    ZygoteCommand,
    ZygoteStarted,
)

decoder_for(LayerCommand)  # built in the root zygote, before any fork


def _preload(cmd: SpawnLayerZygote, channel: Channel[LayerCommand]) -> tuple[str, list[str]]:
    """Import the layer's packages with output captured and `init_timeout` as the deadline.
    A package that fails to import is left to the function's own import (which will say so);
    the names of those are returned as warnings."""
    output = io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = output
    signal.signal(signal.SIGALRM, zygote.alarm)
    signal.setitimer(signal.ITIMER_REAL, cmd.init_timeout)
    warnings: list[str] = []
    try:
        for name in cmd.preload:
            try:
                importlib.import_module(name)
            except zygote.InitTimeout:
                raise
            except Exception as exc:  # the function's import meets it again, and reports it
                warnings.append(f"the layer zygote could not import {name}: {exc!r}")
    except zygote.InitTimeout as exc:
        sys.stdout, sys.stderr = saved
        zygote.fail(channel, exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        sys.stdout, sys.stderr = saved
    return output.getvalue(), warnings


def become(cmd: SpawnLayerZygote, sock: socket.socket, ready_r: int) -> None:
    """Finish the sandbox, import the layer's packages, serve forks; never returns."""
    channel: Channel[LayerCommand] = Channel(sock, LayerCommand)
    if cmd.sandbox is not None:
        try:
            sandbox.finish(cmd.sandbox, "", cmd.network == "none", ready_r, cmd.layer_dir)
        except OSError as exc:
            zygote.sandbox_failed(exc, channel)
    elif cmd.network == "none":
        limits.isolate_network()
    channel.send(ZygoteStarted(pid=os.getpid()))
    layer = sandbox.LAYER_DIR if cmd.sandbox is not None else cmd.layer_dir
    os.chdir(sandbox.CODE_DIR if cmd.sandbox is not None else "/")
    zygote.add_layer(layer, 0)  # the code of each function zygote goes before it
    os.environ.update(cmd.env)
    started = time.perf_counter()
    anon_before = limits.anon_kb()
    with forking.ForkHooks() as hooks:
        output, warnings = _preload(cmd, channel)
    gc.collect(1)
    gc.freeze()
    channel.send(
        zygote.ready_message(started, anon_before, warnings + zygote.thread_warnings(), output)
    )
    try:
        LayerZygote(channel, layer, hooks.foreign).serve()
    finally:
        os._exit(0)


class LayerZygote:
    def __init__(self, channel: Channel[LayerCommand], layer: str, foreign_hooks: int) -> None:
        self.channel = channel
        self.layer = layer
        self.plain = forking.single_threaded() and not foreign_hooks
        self.foreign_hooks = foreign_hooks  # at-fork hooks its packages registered
        self.zygotes: set[int] = set()  # function zygotes forked, alive

    def serve(self) -> None:
        """Forks on command; reaps every child (as pid 1 of its pid namespace, orphans too)."""
        zygote.serve_commands(self.channel.sock.fileno(), self.on_command, self.on_child)

    def on_command(self) -> bool:
        got = self.channel.recv()
        if got is None or isinstance(got[0], Shutdown):
            return False  # its function zygotes die with it (their death signal)
        cmd, fds = got
        if isinstance(cmd, ForkZygote) and fds:
            self.fork(cmd, fds[0])
        return True

    def on_child(self) -> None:
        if self.zygotes & _reap():
            self._end_orphans()

    def fork(self, cmd: ForkZygote, fd: int) -> None:
        try:
            pid = forking.fork(self.plain)
        except OSError:  # EAGAIN, ENOMEM: closing its channel tells the server
            os.close(fd)
            return
        if pid == 0:
            try:
                self._become_function_zygote(cmd, fd)
            finally:
                os._exit(1)
        os.close(fd)
        self.zygotes.add(pid)

    def _end_orphans(self) -> None:
        """A function zygote ended: what its processes left behind was reparented to us (pid 1
        of the pid namespace) and goes too, as it would have with a namespace of its own."""
        self.zygotes = {pid for pid in self.zygotes if _alive(pid)}
        if os.getpid() != 1:  # no sandbox: the root zygote adopts them
            return
        for pid in limits.own_children():
            if pid not in self.zygotes:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _become_function_zygote(self, cmd: ForkZygote, fd: int) -> None:
        parent = os.getppid()
        sock = zygote.prologue(fd, parent)
        waiting: Channel[SpareCommand] = Channel(sock, SpareCommand)
        got = waiting.recv()
        if got is None or not isinstance(got[0], SpawnZygote):
            os._exit(0)
        channel: Channel[ZygoteCommand] = Channel(sock, ZygoteCommand)
        zygote.become(got[0], channel, -1, inside=cmd.code, hooks=self.foreign_hooks)


def _reap() -> set[int]:
    """Every child that ended; their pids."""
    gone: set[int] = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return gone
        if pid == 0:
            return gone
        gone.add(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
