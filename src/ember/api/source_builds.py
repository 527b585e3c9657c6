"""Builds that run package build scripts (source distributions), each in a throw-away sandbox
of the deploying namespace.

Resolving or installing a source distribution runs code the package ships (its build backend,
a `setup.py`). So it never runs on the host: Ember starts a one-off revision of its own builder
function (`ember/layers/sandboxed/handler.py`) in the namespace, with the namespace's uid, no
secrets, the host's network (the index must be reachable), `--build-memory-mb` as its cgroup cap,
`--build-disk-mb` as the size of its private /tmp (where it builds) and `--build-timeout` as its
deadline. It answers with a tar.gz of the installed tree and its lock; the revision is discarded
whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ember.config import ServerConfig
from ember.errors import (
    FunctionError,
    FunctionMemoryExceeded,
    FunctionTimeout,
    RequirementsError,
)
from ember.layers.builder import SourceBuild
from ember.layers.uv import uv_binary
from ember.pool.instance import Instance
from ember.pool.target import Target
from ember.spec import FunctionSpec, ScaleSpec
from ember.wire.messages import Invoke, Result, ZygoteReady

BUILDER = Path(__file__).resolve().parent.parent / "layers" / "sandboxed"


class BuildPool(Protocol):
    async def prepare(self, target: Target) -> ZygoteReady: ...

    async def run_once(self, target: Target, msg: Invoke) -> tuple[Result, str, Instance]: ...

    def discard(self, target: Target) -> None: ...

    def forget_function(self, function: str) -> None: ...


class SourceBuilds:
    def __init__(self, config: ServerConfig, pool: BuildPool, uid_of: Callable[[str], int]) -> None:
        self.config = config
        self.pool = pool
        self.uid_of = uid_of

    async def build(self, namespace: str, requirements: str, index: list[str]) -> SourceBuild:
        """The lock, installed tree (tar.gz) and log of `requirements`, built in a sandbox of
        `namespace`; a `RequirementsError` naming the limit or quoting uv when it fails."""
        job = {"requirements": requirements, "index": index, "uv": uv_binary()}
        job["python"] = sys.executable
        target = self._target(namespace, requirements)
        msg = Invoke(
            id=target.sha256[:32],
            method="POST",
            path="/",
            query=b"",
            headers=[],
            body=json.dumps(job).encode(),
            deadline=time.time() + self.config.build_timeout,
        )
        try:
            await self.pool.prepare(target)
            result, _, _ = await self.pool.run_once(target, msg)
        except FunctionTimeout:
            raise RequirementsError(
                f"building the requirements from source took over "
                f"{self.config.build_timeout:g} s, the limit (ember up --build-timeout)",
                code="build_timeout",
            ) from None
        except FunctionMemoryExceeded:
            raise _over_memory(self.config.build_memory_mb) from None
        except FunctionError as exc:  # the builder itself crashed
            raise RequirementsError(
                f"building the requirements from source failed: {exc.message}", code="build_failed"
            ) from None
        finally:
            self.pool.discard(target)
            self.pool.forget_function(target.qualified)  # its keep-alive state, its logs
        return self._outcome(result)

    def _target(self, namespace: str, requirements: str) -> Target:
        """A one-off revision of the builder function in `namespace`, with the build's limits."""
        config = self.config
        spec = FunctionSpec(
            name="ember-build",
            memory=config.build_memory_mb,
            timeout=config.build_timeout,
            tmp=config.build_disk_mb,
            pids=1024,
            scale=ScaleSpec(max=1),
        )
        key = hashlib.sha256(f"{namespace}\0{requirements}\0{secrets.token_hex(8)}".encode())
        return Target(
            function=f"ember-build-{key.hexdigest()[:8]}",
            number=1,
            sha256=key.hexdigest(),
            code_dir=str(BUILDER),
            spec=spec,
            namespace=namespace,
            uid=self.uid_of(namespace),
            binds=tuple(link for link in config.find_links if "://" not in link),
        )

    def _outcome(self, result: Result) -> SourceBuild:
        """The builder's answer: its archive, uv's failure, or the limit it ran into."""
        said = json.loads(result.body) if result.status == 422 else {}
        if said.get("error") == "memory" or (
            result.error is not None and result.error.kind == "memory"
        ):
            raise _over_memory(self.config.build_memory_mb)
        if said.get("error") == "disk":
            raise RequirementsError(
                f"building the requirements from source needed over {self.config.build_disk_mb} "
                f"MB of disk, the limit (ember up --build-disk-mb): {said['message']}",
                code="build_over_disk",
            )
        if said:
            return SourceBuild(failed=said["error"], message=said["message"])
        if result.status != 200 or result.error is not None:
            detail = result.error.message if result.error is not None else result.body[:2000]
            raise RequirementsError(
                f"building the requirements from source failed: {detail!r}", code="build_failed"
            )
        return SourceBuild(archive=result.body)


def _over_memory(limit_mb: int) -> RequirementsError:
    return RequirementsError(
        f"building the requirements from source used over {limit_mb} MB of memory, the limit "
        "(ember up --build-memory-mb)",
        code="build_over_memory",
    )
