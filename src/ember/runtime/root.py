"""The root zygote: a fresh interpreter with the runtime imported, forking function zygotes.

Started by the server as `python -m ember.runtime.root FD`. It never runs user code itself.
"""

from __future__ import annotations

import asyncio  # noqa: F401  (pre-imported so instances do not pay for it)
import gc
import json  # noqa: F401
import logging
import os
import resource
import signal
import socket
import sys
import time

import msgspec

from ember.runtime import (
    code_mount,
    events,  # noqa: F401  (req.event: parsed in every instance)
    forking,
    instance,
    sandbox,
    zygote,
)
from ember.runtime.api import Context, Request
from ember.runtime.channel import Channel
from ember.wire.frames import frame
from ember.wire.messages import (
    Invoke,
    MountCode,
    RootMessage,
    Shutdown,
    SpawnBlank,
    SpawnZygote,
    ZygoteFailed,
)

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


REHEARSALS = 16  # CPython 3.11 specializes a function's code after 8 calls
_STAND_IN = SpawnZygote(
    revision="rehearsal", code_dir="/", source="", module="", attribute="", function="rehearsal"
)


def _stand_in(req: Request, ctx: Context) -> dict[str, bool]:
    """What the rehearsal calls: Ember's own stand-in, never a user's handler. It reads what
    handlers usually read."""
    return {"ok": req.headers.get("host") == "localhost" and not req.query}


def rehearse() -> None:
    """Serve a few requests to a stand-in handler through the instance's own loop, before the
    root freezes its heap: the request path's code is then specialized, and what it builds on
    first use is built, once, on pages every zygote and instance shares, instead of being
    written (so copied) by every zygote and instance. Measured: 0.2 MB less private memory per
    instance and per function zygote. Streams and logging are left as they were; a failure
    only costs the saving."""
    saved = sys.stdout, sys.stderr
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ours, theirs = socket.socketpair()
    try:
        invoke = Invoke(
            id="rehearsal",
            method="GET",
            path="/",
            query=b"",
            headers=[(b"host", b"localhost")],
            body=b"",
            deadline=time.time() + 60.0,
        )
        encoder = msgspec.msgpack.Encoder()
        ours.sendall(frame(encoder.encode(invoke)) * REHEARSALS + frame(encoder.encode(Shutdown())))
        prepared = instance.Prepared(_STAND_IN, _stand_in)
        loop = instance.InstanceLoop(theirs, _stand_in, _STAND_IN, prepared)
        loop.serve_blocking()
    except Exception as exc:  # an optimisation: the root serves without it
        sys.stdout, sys.stderr = saved
        sys.stderr.write(f"ember root zygote: the request path's rehearsal failed: {exc!r}\n")
    finally:
        ours.close()
        theirs.close()
        sys.stdout, sys.stderr = saved
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        logging.Logger.manager.loggerDict.pop(f"ember.function.{_STAND_IN.function}", None)


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
    rehearse()  # before the freeze below: what it specialized and built is shared
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
        elif isinstance(msg, MountCode):
            _mount_code(msg, fds)


def _spawn(msg: SpawnBlank, fd: int) -> None:
    """Fork a zygote-to-be on `fd`. A failed fork (EAGAIN, ENOMEM) fails that one start, told
    on the new zygote's own channel; the root, and every zygote below it, lives on."""
    root = os.getpid()
    try:
        pid = forking.fork(forking.single_threaded())  # the root runs no user code
    except OSError as exc:
        _refuse(fd, exc)
        return
    if pid == 0:
        try:
            zygote.run(msg, fd, root)
        finally:
            os._exit(1)  # never back into the root's loop
    os.close(fd)


def _mount_code(msg: MountCode, fds: list[int]) -> None:
    """A revision's code into a layer zygote's sandbox, by a throw-away child (it leaves the
    root's mount namespace for good); it answers on the first fd, b"ok" or "ERRNO message";
    the second is the layer zygote's pidfd. The root never waits for it."""
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        return
    answer, pidfd = fds
    try:
        pid = forking.fork(forking.single_threaded())
    except OSError as exc:
        os.write(answer, f"{exc.errno or 0} fork failed: {exc}".encode())
        os.close(answer)
        os.close(pidfd)
        return
    if pid == 0:
        report = b"0 the helper failed"
        try:
            code_mount.mount_code(pidfd, msg.source, msg.name)
            report = b"ok"
        except OSError as exc:
            report = f"{exc.errno or 0} {exc}".encode(errors="replace")[:4000]
        except BaseException as exc:
            report = f"0 {exc!r}".encode(errors="replace")[:4000]
        finally:
            try:
                os.write(answer, report)
            finally:
                os._exit(0)
    os.close(answer)
    os.close(pidfd)


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
