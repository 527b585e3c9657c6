"""What of the host's Python installation a sandbox shows: the interpreter, its standard
library and the directories of Ember itself (`python_paths`); and of each site-packages
directory, only the entries of the runtime's own distributions (`site_packages`). Computed
once, in the root zygote before it freezes its heap (`sandbox.warm`)."""

from __future__ import annotations

import functools
import os
import sys

# Distributions every zygote imports before the function's code: of the interpreter's
# site-packages, a sandbox sees only these (functions bring the rest in their requirements).
RUNTIME_DISTRIBUTIONS = ("ember", "msgspec")


def under(path: str, parents: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents)


@functools.cache
def python_paths() -> tuple[str, ...]:
    """The interpreter, its standard library, the site-packages directories and Ember itself;
    not other `sys.path` entries (a current directory or `PYTHONPATH` would expose the
    operator's files to every function). The same for every zygote: `warm` computes it once
    in the root zygote, before it freezes its heap."""
    import ember

    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    candidates = [
        *prefixes,
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(os.path.dirname(os.path.realpath(ember.__file__))),
        *(
            p
            for p in sys.path
            if p.endswith(("site-packages", "dist-packages"))
            or under(os.path.realpath(p or "."), sorted(prefixes))
        ),
    ]
    out: list[str] = []
    for path in sorted({os.path.realpath(p) for p in candidates if p and os.path.isabs(p)}):
        if os.path.isdir(path) and not under(path, out):
            out.append(path)
    return tuple(out)


def _runtime_entry(name: str) -> bool:
    """A site-packages entry of a runtime distribution: its package, its metadata, or the
    files of an editable install."""
    for dist in RUNTIME_DISTRIBUTIONS:
        under = dist.replace("-", "_")
        if name in (dist, under, f"{under}.py") or name.startswith(
            (f"{dist}-", f"{under}-", f"__editable__.{under}-", f"__editable___{under}_")
        ):
            return True
    return False


@functools.cache
def site_packages() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Each site-packages (or dist-packages) directory of the interpreter, with the entries
    of the runtime's distributions in it: the rest of it stays out of sandboxes."""
    out = []
    for path in sorted(
        {os.path.realpath(p) for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    ):
        if os.path.isdir(path):
            out.append((path, tuple(sorted(e for e in os.listdir(path) if _runtime_entry(e)))))
    return tuple(out)
