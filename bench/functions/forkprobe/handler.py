"""A diagnostic function: timestamps (CLOCK_MONOTONIC, shared by all processes) of the steps of
a start, taken inside the function zygote and the new instance. Used by bench.fork_breakdown.
Its at-fork hooks make its zygote fork with os.fork() (ember/runtime/forking.py).
"""

import time

MARKS = {"import_start": time.perf_counter()}

import importlib  # noqa: E402
import os  # noqa: E402

import ember  # noqa: E402

# PROBE_IMPORTS=numpy,pandas (set in ember.yaml) makes this a stand-in for a heavy function.
for _name in filter(None, os.environ.get("PROBE_IMPORTS", "").split(",")):
    importlib.import_module(_name)


def _mark(name):
    MARKS[name] = time.perf_counter()


os.register_at_fork(before=lambda: _mark("zygote_fork"), after_in_child=lambda: _mark("child"))


@ember.on_fork
def _hook():
    _mark("hooks")


def handle(req, ctx):
    return {**MARKS, "handler": time.perf_counter()}


MARKS["import_end"] = time.perf_counter()
