"""An instance: one forked process serving `Invoke` frames on its socket.

A synchronous handler is called inline by a blocking loop (or by `concurrency` worker threads);
an async handler runs on the instance's own event loop, created after the fork.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from ember.runtime import convert, limits
from ember.runtime.api import Context, Request, fork_hooks
from ember.runtime.capture import Capture, current_request
from ember.wire.frames import MAX_FRAME, FrameDecoder, FrameTooLarge, frame
from ember.wire.messages import InstanceCommand, Invoke, Log, Result, Shutdown, SpawnZygote

Handler = Callable[[Request, Context], Any]

# Built once in the root zygote and inherited: building a typed decoder costs ~0.5 ms.
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(InstanceCommand)
# What one recv() may return. Python allocates the whole size first: 1 MiB took an mmap, an
# mremap and a munmap per request (+15 us outside the sandbox, ~55 us in it, measured), while
# 64 KiB comes from the heap; a bigger frame simply takes several reads.
RECV_BYTES = 64 * 1024


class InstanceLoop:
    """The instance process's side: serves `Invoke` frames (the server's handle on it is
    `ember.pool.instance.Instance`)."""

    def __init__(
        self, sock: socket.socket, handler: Handler, spec: SpawnZygote, prepared: Prepared
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.spec = spec
        self.log = prepared.log
        self.encoder = _ENCODER
        self.decoder = _DECODER
        self.frames = FrameDecoder()
        self.send_lock = threading.Lock()
        self.capture = prepared.capture.install(self.send)
        self.hook_error: BaseException | None = None

    def send(self, msg: Result | Log) -> None:
        """Write one whole frame. In async mode the socket is non-blocking for the loop's reads,
        so a send blocks it briefly: a frame is never interleaved with another."""
        data = frame(self.encoder.encode(msg))
        with self.send_lock:
            if self.sock.getblocking():
                self.sock.sendall(data)
                return
            self.sock.setblocking(True)
            try:
                self.sock.sendall(data)
            finally:
                self.sock.setblocking(False)

    def run_hooks(self) -> None:
        limits.reseed()
        try:
            for hook in fork_hooks():
                hook()
        except Exception as exc:  # reported on every request this instance gets
            self.hook_error = exc

    def context(self, msg: Invoke) -> tuple[Request, Context]:
        raw = msg.raw_path or msg.path
        req = Request(msg.method, msg.path, msg.query, msg.headers, msg.body, raw_path=raw)
        ctx = Context(
            msg.id, self.spec.function, msg.revision, self.spec.memory_mb, msg.deadline, self.log
        )
        return req, ctx

    def finish(self, msg: Invoke, result: Result, started: float) -> None:
        """Send the result; one that cannot be sent (over the frame limit) is answered by an
        error naming why, at once: the caller never waits for its timeout instead."""
        self.capture.finish(msg.id)
        done = msgspec.structs.replace(
            result,
            duration_ms=(time.perf_counter() - started) * 1000.0,
            max_rss_kb=limits.peak_rss_kb(),
        )
        try:
            self.send(done)
        except FrameTooLarge:
            self.send(convert.too_large(msg.id, len(result.body), MAX_FRAME))
        if result.error is not None and result.error.kind == "memory":
            os._exit(70)  # the heap may be corrupt; the server forks a fresh one

    def outcome(self, msg: Invoke, handler: Handler, req: Request, ctx: Context) -> Result:
        if self.hook_error is not None:
            return convert.error_result(msg.id, self.hook_error)
        try:
            return convert.to_result(msg.id, handler(req, ctx))
        except MemoryError as exc:
            return convert.error_result(msg.id, exc, kind="memory")
        except Exception as exc:
            return convert.error_result(msg.id, exc)

    def run_sync(self, msg: Invoke) -> None:
        started = time.perf_counter()
        token = current_request.set(msg.id)
        try:
            req, ctx = self.context(msg)
            result = self.outcome(msg, self.handler, req, ctx)
            self.finish(msg, result, started)
        except BaseException:  # sys.exit() in a handler, even on a worker thread: a crash
            os._exit(1)
        finally:
            current_request.reset(token)

    async def run_async(self, msg: Invoke) -> None:
        started = time.perf_counter()
        current_request.set(msg.id)  # each task has its own context
        req, ctx = self.context(msg)
        if self.hook_error is not None:
            result = convert.error_result(msg.id, self.hook_error)
        else:
            try:
                result = convert.to_result(msg.id, await self.handler(req, ctx))
            except MemoryError as exc:
                result = convert.error_result(msg.id, exc, kind="memory")
            except (Exception, asyncio.CancelledError) as exc:  # cancelled by its own code
                result = convert.error_result(msg.id, exc)
        try:
            self.finish(msg, result, started)
        except BaseException:  # as on the sync path: a result that cannot go out is a crash,
            os._exit(1)  # which the server answers at once (502), never a hang

    def commands(self, data: bytes) -> list[InstanceCommand]:
        return [self.decoder.decode(raw) for raw in self.frames.feed(data)]

    def serve_blocking(self) -> None:
        workers = ThreadPoolExecutor(self.spec.concurrency) if self.spec.concurrency > 1 else None
        while data := self.sock.recv(RECV_BYTES):
            for msg in self.commands(data):
                if isinstance(msg, Shutdown):
                    return
                if workers is not None:
                    workers.submit(self.run_sync, msg)
                else:
                    self.run_sync(msg)

    async def serve_async(self) -> None:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        tasks: set[asyncio.Task[None]] = set()
        while data := await loop.sock_recv(self.sock, RECV_BYTES):
            for msg in self.commands(data):
                if isinstance(msg, Shutdown):
                    return
                task = loop.create_task(self.run_async(msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class Prepared:
    """What every instance of a revision needs, built once in its zygote before forking: each
    page an instance writes first is a copy (and a page fault on its start's path)."""

    def __init__(self, spec: SpawnZygote, handler: Handler) -> None:
        self.capture = Capture()
        self.capture.route_logging()
        self.log = logging.getLogger(f"ember.function.{spec.function}")
        self.is_async = inspect.iscoroutinefunction(handler)


def run(fd: int, handler: Handler, spec: SpawnZygote, prepared: Prepared) -> None:
    """Entry point in the forked child; never returns."""
    code = 0
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)  # no probing of fd
        instance = InstanceLoop(sock, handler, spec, prepared)
        instance.run_hooks()
        if prepared.is_async:
            loop = _new_loop()
            loop.run_until_complete(instance.serve_async())
        else:
            instance.serve_blocking()
    except BaseException:
        code = 1
    finally:
        os._exit(code)
