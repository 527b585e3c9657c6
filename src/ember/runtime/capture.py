"""Per-invocation capture of stdout, stderr and `logging`, sent to the server as `Log` frames.

The current request id lives in a context variable, so output of concurrent invocations in one
instance is attributed correctly. Writes at the file-descriptor level (C extensions, child
processes) bypass this and go to the server's own stderr.
"""

from __future__ import annotations

import contextvars
import io
import logging
import sys
import threading
import time
from collections.abc import Callable

from ember.wire.messages import Log

current_request: contextvars.ContextVar[str] = contextvars.ContextVar("ember_request", default="")
FLUSH_AT = 64 * 1024

Sender = Callable[[Log], None]


class CaptureStream(io.TextIOBase):
    """A text stream that buffers per request id and hands chunks to `send`."""

    def __init__(self, stream: str, send: Sender) -> None:
        super().__init__()
        self._stream = stream
        self._send = send
        self._lock = threading.Lock()
        self._buffers: dict[str, list[str]] = {}
        self._sizes: dict[str, int] = {}

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        rid = current_request.get()
        with self._lock:
            self._buffers.setdefault(rid, []).append(text)
            size = self._sizes.get(rid, 0) + len(text)
            self._sizes[rid] = size
        if size >= FLUSH_AT:
            self.flush_request(rid)
        return len(text)

    def flush(self) -> None:
        self.flush_request(current_request.get())

    def flush_request(self, rid: str) -> None:
        if rid not in self._buffers:  # nothing written for it: the usual case, without the lock
            return
        with self._lock:
            parts = self._buffers.pop(rid, None)
            self._sizes.pop(rid, None)
        if parts:
            self._send(Log(id=rid, stream=self._stream, ts=time.time(), data="".join(parts)))


class CaptureHandler(logging.Handler):
    def __init__(self, send: Sender) -> None:
        super().__init__()
        self._send = send
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self._send(Log(id=current_request.get(), stream="log", ts=record.created, data=text))


class Capture:
    """The streams and the logging handler of an instance; `finish(rid)` flushes one invocation.

    Built in the function zygote, before any fork, so an instance only has to `install` it.
    """

    def __init__(self) -> None:
        self._send: Sender | None = None
        self.stdout = CaptureStream("stdout", self._emit)
        self.stderr = CaptureStream("stderr", self._emit)
        self.handler = CaptureHandler(self._emit)

    def _emit(self, msg: Log) -> None:
        if self._send is not None:
            self._send(msg)

    def route_logging(self) -> None:
        """The root logger's records to this capture alone, at INFO or finer. Done once in the
        zygote, after the module's import (which may have configured logging): what logging
        writes here on the first use is then shared by every instance, not written by each.
        Until an instance installs a sender, records are dropped (the zygote runs no code of
        the function's)."""
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(self.handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)

    def install(self, send: Sender) -> Capture:
        """In the instance: its output goes to `send`."""
        self._send = send
        sys.stdout = self.stdout
        sys.stderr = self.stderr
        return self

    def finish(self, rid: str) -> None:
        self.stdout.flush_request(rid)
        self.stderr.flush_request(rid)
