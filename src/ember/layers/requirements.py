"""What a function asks to have installed: its `requirements.txt`, or the `dependencies` of
the `[project]` table of its `pyproject.toml`, read and checked before anything resolves.

Only named requirements with version specifiers, extras and markers are taken. Where packages
come from is the operator's choice (`ember up --index-url …`), never the function's, so a
requirements file may not carry options (`-i`, `--extra-index-url`, `-f`, `-r`, `-e`, …), and a
requirement may not name a URL or a path (`pkg @ https://…`, `./wheels/x.whl`). A package that
Ember's runtime imports into every zygote before the function's code cannot be replaced by the
function's own copy, so asking for it is refused rather than silently ignored.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ember.errors import RequirementsError
from ember.runtime.host_paths import RUNTIME_DISTRIBUTIONS

REQUIREMENTS_FILE = "requirements.txt"
PYPROJECT_FILE = "pyproject.toml"
MAX_FILE_BYTES = 64 * 1024
# Imported by every zygote before the function's module (ember.runtime, ember.wire): the
# function always gets the runtime's copy, so a requirement on them could not be honoured.
RUNTIME_PACKAGES = frozenset(RUNTIME_DISTRIBUTIONS)


@dataclass(frozen=True, slots=True)
class Requirements:
    """A function's requirements, one normalized line each, in the order written."""

    source: str  # the file they came from, relative to the function's directory
    lines: tuple[str, ...]

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def _refuse(
    source: str, number: int, line: str, why: str, code: str = "bad_requirements"
) -> NoReturn:
    raise RequirementsError(f"{source} line {number}: {line.strip()!r}: {why}", code=code)


def parse(text: str, source: str) -> Requirements:
    """Check every line; the first one that cannot be taken is named in the error."""
    lines: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.endswith("\\"):
            _refuse(source, number, raw, "line continuations are not supported; one per line")
        if line.startswith("-"):
            _refuse(
                source,
                number,
                raw,
                "options are not taken from a function's requirements; where packages come "
                "from is set on the server (ember up --index-url, --find-links)",
            )
        by_location = "://" in line or line.startswith((".", "/", "~")) or " @ " in line
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            if by_location:
                req = None
            else:
                _refuse(source, number, raw, f"not a requirement: {exc}")
        if req is None or req.url:
            _refuse(
                source,
                number,
                raw,
                "requirements by URL or path are refused; publish the package to the "
                "server's index or wheelhouse and require it by name",
            )
        name = canonicalize_name(req.name)
        if name in RUNTIME_PACKAGES:
            _refuse(
                source,
                number,
                raw,
                f"{req.name} is part of Ember's runtime and imported into every function "
                f"before its code (runtime packages: {', '.join(sorted(RUNTIME_PACKAGES))}); "
                "remove the line: the runtime's copy is the one the function gets",
                code="runtime_conflict",
            )
        if name in seen:
            _refuse(source, number, raw, f"{req.name} is already required on line {seen[name]}")
        seen[name] = number
        lines.append(str(req))
    return Requirements(source, tuple(lines))


def read(function_dir: Path) -> Requirements | None:
    """The requirements of the function whose code is in `function_dir`; None when it has
    none (no file, or a pyproject.toml without dependencies)."""
    req_file = function_dir / REQUIREMENTS_FILE
    pyproject = function_dir / PYPROJECT_FILE
    if req_file.is_file():
        found = parse(_text(req_file), REQUIREMENTS_FILE)
    elif pyproject.is_file():
        found = _from_pyproject(_text(pyproject))
    else:
        return None
    return found if found.lines else None


def _text(path: Path) -> str:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise RequirementsError(
            f"{path.name} is {path.stat().st_size} bytes; it may be at most "
            f"{MAX_FILE_BYTES // 1024} KB",
            code="bad_requirements",
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RequirementsError(f"{path.name} is not UTF-8 text", code="bad_requirements") from None


def _from_pyproject(text: str) -> Requirements:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RequirementsError(f"{PYPROJECT_FILE}: {exc}", code="bad_requirements") from None
    deps = data.get("project", {}).get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise RequirementsError(
            f"{PYPROJECT_FILE}: [project] dependencies must be a list of strings",
            code="bad_requirements",
        )
    return parse("\n".join(deps), f"{PYPROJECT_FILE} [project] dependencies")
