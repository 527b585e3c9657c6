"""What the root zygote prepares before it freezes its heap, which every zygote and instance
then shares: its imports (no more than the runtime needs) and the rehearsal of the request
path (specialized once there, with no trace left in its streams or logging).

Each check runs in a fresh interpreter: importing the root zygote or rehearsing changes the
process it runs in.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_root_zygote_imports_no_shared_objects_it_does_not_need() -> None:
    # ctypes.util imports shutil, bz2 and lzma: four shared objects more in every zygote,
    # whose mappings every fork copies.
    got = _run(
        """
        import json, sys
        import ember.runtime.root
        from ember.runtime import limits
        libc = limits.load_libc()
        unwanted = ("ctypes.util", "shutil", "bz2", "lzma")
        print(json.dumps({
            "loaded": sorted(m for m in unwanted if m in sys.modules),
            "prctl": libc is not None and hasattr(libc, "prctl"),
        }))
        """
    )
    assert got == {"loaded": [], "prctl": sys.platform.startswith("linux")}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="specialization came with CPython 3.11")
def test_rehearsal_specializes_the_request_path_and_leaves_no_trace() -> None:
    got = _run(
        """
        import dis, json, logging, sys
        from ember.runtime import instance, root

        def specialized(code):
            generic = {i.opname for i in dis.get_instructions(code)}
            adaptive = {i.opname for i in dis.get_instructions(code, adaptive=True)}
            return sorted(adaptive - generic)

        handler = logging.StreamHandler(sys.stderr)
        logging.getLogger().addHandler(handler)
        streams = sys.stdout, sys.stderr
        before = specialized(instance.InstanceLoop.run_sync)
        root.rehearse()
        after = specialized(instance.InstanceLoop.run_sync)
        print(json.dumps({
            "before": before,
            "after": bool(after),
            "streams": (sys.stdout, sys.stderr) == streams,
            "handlers": logging.getLogger().handlers == [handler],
            "level": logging.getLogger().level,
            "loggers": [n for n in logging.Logger.manager.loggerDict if "rehearsal" in n],
        }))
        """
    )
    assert got == {
        "before": [],
        "after": True,
        "streams": True,
        "handlers": True,
        "level": 30,
        "loggers": [],
    }


def test_an_instance_starts_with_default_signal_handlers() -> None:
    # What a zygote installed for itself (its SIGCHLD handler, its wake-up fd) and what user
    # code set at import is not an instance's: `default_signals` resets them after the fork.
    got = _run(
        """
        import json, os, signal
        from ember.runtime import limits
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        limits.default_signals()
        names = ("SIGCHLD", "SIGTERM", "SIGHUP", "SIGUSR1")
        print(json.dumps({
            "default": [n for n in names if signal.getsignal(getattr(signal, n)) == signal.SIG_DFL],
            "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
            "wakeup": signal.set_wakeup_fd(-1),
        }))
        """
    )
    names = ["SIGCHLD", "SIGTERM", "SIGHUP", "SIGUSR1"]
    assert got == {"default": names, "sigint": True, "wakeup": -1}
