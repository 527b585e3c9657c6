"""The function that builds requirements needing build scripts (source distributions), run by
Ember in a throw-away sandbox of the deploying namespace: its uid, its own /tmp as the build's
disk, a memory cap, a time limit, no secrets, no view of EMBER_HOME or other tenants' code.

The body is a JSON job: the requirements, uv's path and the operator's index arguments. The
answer is a tar.gz of the installed tree (`site/`) and the lock (`lock.txt`), or a 422 with uv's
message. Only the standard library: this runs inside the sandbox, beside nothing of the server.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import tarfile
from typing import Any

WORK = "/tmp/build"


def _uv(job: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": WORK,
        "UV_CACHE_DIR": WORK + "/cache",
        "UV_NO_PROGRESS": "1",
        "NO_COLOR": "1",
    }
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    cmd = [job["uv"], "pip", *args[:1], "--no-config", "--python", job["python"]]
    return subprocess.run(
        [*cmd, *job["index"], *args[1:]], cwd=WORK, env=env, capture_output=True, text=True
    )


def _failed(step: str, done: subprocess.CompletedProcess[str]) -> tuple[dict[str, str], int]:
    said = (done.stderr or done.stdout).strip()
    if "No space left on device" in said:
        return {"error": "disk", "message": said[-4000:]}, 422
    if "SIGKILL" in said:  # here, only the cgroup's out-of-memory killer sends it
        return {"error": "memory", "message": said[-4000:]}, 422
    return {"error": step, "message": said[-4000:]}, 422


def handle(req: Any, ctx: Any) -> Any:
    job = json.loads(req.body)
    try:
        os.makedirs(WORK, exist_ok=True)
        with open(f"{WORK}/requirements.in", "w") as f:
            f.write(job["requirements"])
        done = _uv(
            job,
            "compile",
            "requirements.in",
            "--generate-hashes",
            "--no-header",
            "--no-annotate",
            "--output-file",
            "lock.txt",
        )
        if done.returncode != 0:
            return _failed("compile", done)
        log = done.stderr.strip()
        done = _uv(
            job,
            "install",
            "--target",
            "site",
            "--no-deps",
            "--require-hashes",
            "--compile-bytecode",
            "-r",
            "lock.txt",
        )
        if done.returncode != 0:
            return _failed("install", done)
        log += "\n" + done.stderr.strip()
        with open(f"{WORK}/build.log", "w") as f:
            f.write(log)
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as tar:
            for name in ("lock.txt", "build.log", "site"):
                tar.add(f"{WORK}/{name}", arcname=name)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return {"error": "disk", "message": str(exc)}, 422
        raise
    return out.getvalue(), 200, {"Content-Type": "application/gzip"}
