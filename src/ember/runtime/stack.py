"""Tracebacks as callers see them: no host paths.

A frame of the function's own code shows its path relative to the code directory
(`handler.py`, `lib/util.py`); a frame of Ember's runtime shows as `<ember>` without its source
line; a frame of a library shows its path relative to the `sys.path` entry it was imported from
(`json/decoder.py`, `numpy/core/...`). So a stack trace tells the user what they need and
nothing about where Ember or its environment are installed.
"""

from __future__ import annotations

import os
import sys
import traceback

import ember

EMBER_FRAME = "<ember>"
_EMBER_DIR = os.path.dirname(os.path.abspath(ember.__file__)) + os.sep
_code_dir = ""  # set by the zygote before it imports the function


def set_code_dir(path: str) -> None:
    global _code_dir
    _code_dir = os.path.abspath(path).rstrip(os.sep) + os.sep


def display_path(filename: str) -> str:
    path = os.path.abspath(filename) if os.path.isabs(filename) else filename
    if _code_dir and path.startswith(_code_dir):
        return path[len(_code_dir) :]
    if path.startswith(_EMBER_DIR):
        return EMBER_FRAME
    for entry in sorted((p for p in sys.path if p), key=len, reverse=True):
        base = os.path.abspath(entry).rstrip(os.sep) + os.sep
        if path.startswith(base):
            return path[len(base) :]
    return os.path.basename(path) if os.path.isabs(path) else path


def format_exception(exc: BaseException, *, skip_ember: bool = False) -> list[str]:
    """`traceback.format_exception` with display paths; with `skip_ember`, without the
    runtime's own frames and the import machinery at all (as for a failed import)."""
    te = traceback.TracebackException.from_exception(exc)  # reads source lines now
    seen: set[int] = set()
    pending: list[traceback.TracebackException | None] = [te]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        frames = [_displayed(f) for f in current.stack]
        if skip_ember:
            frames = [
                f for f in frames if f.filename != EMBER_FRAME and "importlib" not in f.filename
            ]
        current.stack = traceback.StackSummary.from_list(frames)
        pending += [current.__cause__, current.__context__]
    return list(te.format())


def _displayed(frame: traceback.FrameSummary) -> traceback.FrameSummary:
    shown = display_path(frame.filename)
    return traceback.FrameSummary(
        shown,
        frame.lineno,
        frame.name,
        lookup_line=False,
        line="" if shown == EMBER_FRAME else frame.line,  # none of our source
        end_lineno=frame.end_lineno,
        colno=frame.colno,
        end_colno=frame.end_colno,
    )
