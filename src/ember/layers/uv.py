"""Running uv: `uv pip compile` resolves a function's requirements into a lock, `uv pip
install --target` installs a lock. Both run as subprocesses with the operator's index settings,
a package cache, no configuration files read (`--no-config`, and a working directory of their
own: never the function's), an environment reduced to what they need, and wheels only (what
needs building runs in a namespace's sandbox: ember.api.source_builds). A failure is a
`RequirementsError` (422) that quotes uv and names the requirement line it is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.errors import RequirementsError
from ember.layers.requirements import Requirements

MAX_MESSAGE = 4000  # characters of the installer's output in an error
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def uv_binary() -> str:
    """The uv executable of Ember's own environment (the `uv` wheel)."""
    from uv import find_uv_bin

    return find_uv_bin()


@dataclass(frozen=True, slots=True)
class PackageIndex:
    """Where builds download from: the operator's settings of `ember up`."""

    index_url: str = ""
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False  # only find_links
    offline: bool = False  # only uv's cache (and find_links)

    def args(self) -> list[str]:
        out: list[str] = []
        if self.index_url:
            out += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            out += ["--extra-index-url", url]
        for link in self.find_links:
            out += ["--find-links", link]
        if self.no_index:
            out.append("--no-index")
        if self.offline:
            out.append("--offline")
        return out


@dataclass(frozen=True, slots=True)
class Uv:
    """uv as the server runs it: where packages come from, its cache, its time limit."""

    index: PackageIndex
    cache: Path
    timeout: float

    async def run(
        self,
        reqs: Requirements,
        cwd: str,
        command: str,
        *args: str,
        heard: Callable[[str], None] | None = None,
    ) -> str:
        """Run `uv pip COMMAND`: what it said (its summary lines), or its message as a
        `RequirementsError` when it fails. `heard` gets each line as uv says it."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": cwd,
            "UV_CACHE_DIR": str(self.cache),
            "UV_NO_PROGRESS": "1",
            "NO_COLOR": "1",
        }
        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"):
            if name in os.environ:
                env[name] = os.environ[name]
        proc = await asyncio.create_subprocess_exec(
            uv_binary(),
            "pip",
            command,
            "--no-config",
            "--python",
            sys.executable,
            "--only-binary",
            ":all:",
            *self.index.args(),
            *args,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            err, _, _ = await asyncio.wait_for(
                asyncio.gather(_lines(proc.stderr, heard), _drain(proc.stdout), proc.wait()),
                self.timeout,
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RequirementsError(
                f"building the requirements ({reqs.source}) took over {self.timeout:g} s, the "
                "limit (ember up --build-timeout)",
                code="build_timeout",
            ) from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        said = _ANSI.sub("", err.decode(errors="replace")).strip()
        if proc.returncode != 0:
            raise failure(reqs, command, said)
        return f"$ uv pip {command}\n{said}"


async def _lines(stream: asyncio.StreamReader | None, heard: Callable[[str], None] | None) -> bytes:
    """All of `stream`, each line passed to `heard` as it comes."""
    if stream is None:
        return b""
    got = bytearray()
    while line := await stream.readline():
        got += line
        if heard is not None:
            heard(_ANSI.sub("", line.decode(errors="replace")).strip())
    return bytes(got)


async def _drain(stream: asyncio.StreamReader | None) -> None:
    if stream is not None:
        await stream.read()


_DOWNLOADING = re.compile(r"^Downloading (\S+) \(([\d.]+)(B|KiB|MiB|GiB)\)$")
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def downloading(line: str) -> tuple[str, int] | None:
    """A package uv starts to download and its size, from its line about it. uv names only
    downloads over about a megabyte (the ones worth waiting for)."""
    found = _DOWNLOADING.match(line)
    if found is None:
        return None
    return found[1], int(float(found[2]) * _UNITS[found[3]])


def needs_building(exc: RequirementsError) -> bool:
    """uv refused because a package has no wheel: only building it from source would do."""
    said = exc.message.lower()
    return "building from source is disabled" in said or "no wheels" in said


def pins(lock: str) -> list[str]:
    return [
        line.split(" ", 1)[0].rstrip("\\").strip()
        for line in lock.splitlines()
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line
    ]


def failure(reqs: Requirements, command: str, message: str) -> RequirementsError:
    """The installer's message, with the requirement line it is about when one is named."""
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + " …"
    lowered = message.lower()
    culprit = next(
        (
            line
            for line in reqs.lines
            if re.search(rf"\b{re.escape(_name(line).lower())}\b", lowered) is not None
        ),
        None,
    )
    where = f" (line {reqs.lines.index(culprit) + 1}: {culprit})" if culprit else ""
    what = "resolving" if command == "compile" else "installing"
    hint = ""
    if any(
        sign in lowered
        for sign in ("no wheels", "only-binary", "building from source", "source distribution")
    ):
        hint = (
            "; this server installs wheels only (ember up --no-source-builds): pick a version "
            "with a wheel for this platform"
        )
    return RequirementsError(
        f"{what} {reqs.source} failed{where}: {message}{hint}",
        code="requirements_unresolvable" if command == "compile" else "build_failed",
    )


def _name(line: str) -> str:
    return re.split(r"[\s\[<>=!~;@(]", line, maxsplit=1)[0]
