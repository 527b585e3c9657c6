"""The root zygote: a fresh interpreter with the runtime imported, forking function zygotes.

Started by the server as `python -m ember.runtime.root FD`. It never runs user code itself.
"""

from __future__ import annotations

import asyncio  # noqa: F401  (pre-imported so instances do not pay for it)
import gc
import json  # noqa: F401
import os
import resource
import signal
import socket
import sys

import msgspec

from ember.runtime import instance, sandbox, zygote  # noqa: F401
from ember.runtime.channel import Channel
from ember.wire.messages import RootMessage, Shutdown, SpawnBlank, ZygoteFailed

try:
    import uvloop  # noqa: F401
except ImportError:  # pragma: no cover
    pass


def _reap(*_: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(fd: int, nofile: int = 0) -> None:
    from ember.runtime import limits

    if nofile > 0:  # the server raised its own fd limit; functions get the usual one
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

    limits.die_with_parent(os.getppid())
    limits.become_subreaper()  # sandboxed zygotes are handed to us by their keepers
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    channel: Channel[RootMessage] = Channel(socket.socket(fileno=fd), RootMessage)
    sandbox.warm()  # computed once here, not in every zygote (whose writes are private pages)
    # Everything imported so far is shared by every zygote and instance: freezing it keeps the
    # zygotes' own gc.collect() from walking (and copying) these pages.
    gc.collect()
    gc.freeze()
    while True:
        try:
            got = channel.recv()
        except InterruptedError:
            continue
        if got is None or isinstance(got[0], Shutdown):
            return
        msg, fds = got
        if isinstance(msg, SpawnBlank) and fds:
            _spawn(msg, fds[0])


def _spawn(msg: SpawnBlank, fd: int) -> None:
    """Fork a zygote-to-be on `fd`. A failed fork (EAGAIN, ENOMEM) fails that one start, told
    on the new zygote's own channel; the root, and every zygote below it, lives on."""
    root = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        _refuse(fd, exc)
        return
    if pid == 0:
        try:
            zygote.run(msg, fd, root)
        finally:
            os._exit(1)  # never back into the root's loop
    os.close(fd)


def _refuse(fd: int, exc: OSError) -> None:
    sock = socket.socket(fileno=fd)
    failed = ZygoteFailed(error_type="ForkFailed", message=str(exc), traceback="", platform=True)
    try:
        sock.send(msgspec.msgpack.encode(failed))
    except OSError:
        pass  # the server gave up on it: closing is answer enough
    finally:
        sock.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
