"""The sandbox, proved from inside deployed functions (issue 3, item 4).

These run wherever the suite runs as root on Linux, which CI does; under CI=true a host without
the sandbox is a failure, not a skip.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import EmberServer, alive, ember_cmd, named, wait_for

SANDBOX = os.geteuid() == 0 and os.uname().sysname == "Linux"
# Numbers of the raw system calls SPY tries, per architecture (the test's own table, not Ember's).
SYSCALLS = {
    "x86_64": {"keyctl": 250, "bpf": 321, "reboot": 169},
    "aarch64": {"keyctl": 219, "bpf": 280, "reboot": 142},
}


def needs(ok: bool, why: str) -> None:
    """Skip a test this host cannot run; under CI=true a missing capability fails instead."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module", autouse=True)
def _sandbox_here() -> None:
    needs(SANDBOX, "the sandbox needs root on Linux")


def _raw_syscalls() -> str:
    machine = os.uname().machine
    needs(machine in SYSCALLS, f"no system call numbers for {machine} in this test")
    return ",".join(f"{name}:{nr}" for name, nr in SYSCALLS[machine].items())


def _rss_mb(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss) // (1024 * 1024)
    except psutil.NoSuchProcess:
        return 0


def _info(server: EmberServer, name: str) -> dict:
    data: dict = server.api.get(f"/api/v1/functions/{name}").json()
    return data


SPY = r"""
import ctypes, errno, json, os, socket

libc = ctypes.CDLL(None, use_errno=True)

def attempt(fn, *args):
    ctypes.set_errno(0)
    rc = fn(*args)
    return "ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))

def readable(path):
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False

def handle(req, ctx):
    q = req.query
    out = {
        "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "hostname": socket.gethostname(),
        "root": sorted(os.listdir("/")),
        "code": sorted(os.listdir("/code")),
        "secrets": sorted(os.listdir("/run/secrets")),
        "read": {p: readable(p) for p in q.get("read", "").split(",") if p},
        "exists": {p: os.path.exists(p) for p in q.get("exists", "").split(",") if p},
        "mount": attempt(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None),
        "unshare_user": attempt(libc.unshare, 0x10000000),
        "unshare_net": attempt(libc.unshare, 0x40000000),
        "ptrace": attempt(libc.ptrace, 16, 1, None, None),
        "no_new_privs": open("/proc/self/status").read().count("NoNewPrivs:\t1"),
        "seccomp": "Seccomp:\t2" in open("/proc/self/status").read(),
    }
    try:
        open("/code/written", "w")
        out["code_write"] = "ok"
    except OSError as exc:
        out["code_write"] = errno.errorcode[exc.errno]
    try:
        open("/usr/written", "w")
        out["usr_write"] = "ok"
    except OSError as exc:
        out["usr_write"] = errno.errorcode[exc.errno]
    for pair in filter(None, q.get("nr", "").split(",")):  # raw system calls: name:number
        name, nr = pair.split(":")
        out[name] = attempt(libc.syscall, int(nr), 0, 0, 0, 0)
    if "tmp" in q:
        with open("/tmp/" + q["tmp"], "w") as f:
            f.write("mine")
    out["tmp"] = sorted(os.listdir("/tmp"))
    return out
"""


def _spy(server: EmberServer, name: str, namespace: str = "default", **query: str) -> dict:
    prefix = "" if namespace == "default" else f"{namespace}/"
    resp = server.http.get(f"/fn/{prefix}{name}", params=query)
    assert resp.status_code == 200, resp.text
    return json.loads(resp.content)


def test_a_function_sees_only_its_own_code_processes_tmp_and_no_state(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    server.deploy(fn_dir("spy-a", SPY, files={"only-a.txt": b"a"}))
    server.deploy(fn_dir("spy-b", SPY, files={"only-b.txt": b"b"}))
    state = [str(server.home), str(server.home / "ember.db"), str(server.home / "credentials")]
    code_dirs = [str(p) for p in (server.home / "code").iterdir()]
    a = _spy(server, "spy-a", tmp="from-a", read=",".join(state + code_dirs))
    b = _spy(server, "spy-b", exists=",".join(state + code_dirs + ["/tmp/from-a"]))

    assert "only-a.txt" in a["code"] and "only-b.txt" not in a["code"]
    assert "only-b.txt" in b["code"] and "only-a.txt" not in b["code"]
    assert not any(a["read"].values()), f"state or code of others readable: {a['read']}"
    assert not any(b["exists"].values()), f"visible from inside: {b['exists']}"
    assert "from-a" in a["tmp"] and "from-a" not in b["tmp"], "each sandbox has its own /tmp"
    assert "code" in a["root"] and a["root"] == b["root"]
    # pid namespace: the zygote is 1, the instance 2 (or the next); nothing of the host
    assert a["pids"][0] == 1 and len(a["pids"]) <= 3 and a["pid"] in a["pids"]
    assert a["hostname"] == "spy-a"
    assert a["uid"] != 0 and a["gid"] != 0
    assert a["code_write"] == "EROFS" and a["usr_write"] == "EROFS"


def test_blocked_system_calls_fail_with_eperm(server: EmberServer, fn_dir: Callable[..., Path]):
    server.deploy(fn_dir("spy-sys", SPY))
    got = _spy(server, "spy-sys", nr=_raw_syscalls())
    for call in ("mount", "unshare_user", "unshare_net", "ptrace", "keyctl", "bpf", "reboot"):
        assert got[call] == "EPERM", (call, got[call])
    assert got["no_new_privs"] == 1 and got["seccomp"]


def test_namespaces_run_as_different_uids(server: EmberServer, fn_dir: Callable[..., Path]):
    server.deploy(fn_dir("spy-ns", SPY))
    server.deploy(fn_dir("spy-ns", SPY), "--namespace", "tenant-x")
    mine = _spy(server, "spy-ns")
    theirs = _spy(server, "spy-ns", namespace="tenant-x")
    assert mine["uid"] != theirs["uid"] and 0 not in (mine["uid"], theirs["uid"])


FORK_BOMB = """
import ctypes, os, time
ctypes.CDLL(None).prctl(15, b"ember-bomb", 0, 0, 0)  # PR_SET_NAME: how the test finds it
def handle(req, ctx):
    children, error = 0, None
    try:
        while children < 1000:
            pid = os.fork()
            if pid == 0:
                time.sleep(120)  # holds its pid past the test; ends with the zygote (pid 1)
                os._exit(0)
            children += 1
    except OSError as exc:
        error = exc.errno
    return {"children": children, "errno": error}
"""


def test_a_fork_bomb_stops_at_the_pids_limit_and_others_keep_answering(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    server.deploy(fn_dir("bomb", FORK_BOMB, "functions:\n  bomb:\n    pids: 40\n"))
    got = server.http.get("/fn/bomb").json()
    assert got["errno"] == 11 and got["children"] < 40, got  # EAGAIN at pids.max
    # While the bomb's children hold every pid it may have, another function still starts:
    # a new zygote (the deploy) and a new instance (the request).
    server.deploy(fn_dir("calm", "def handle(req, ctx):\n    return 'calm'\n"))
    calm = server.http.get("/fn/calm")
    assert calm.text == "calm" and calm.headers["x-ember-start"] == "fork"
    assert len(named("ember-bomb")) == 2 + got["children"], "zygote, instance, children"


SPINNER = """
import ctypes, time
ctypes.CDLL(None).prctl(15, b"ember-spin", 0, 0, 0)  # PR_SET_NAME: how the test finds it
def handle(req, ctx):
    wall = float(req.query.get("seconds", "1"))
    cpu0, t0 = time.process_time(), time.monotonic()
    while time.monotonic() - t0 < wall:
        pass
    return {"cpu": time.process_time() - cpu0, "wall": time.monotonic() - t0}
"""


def test_a_cpu_spinner_is_held_to_its_share_and_killed_at_its_timeout(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    manifest = "functions:\n  spin:\n    cpu: 0.25\n    timeout: 3s\n"
    server.deploy(fn_dir("spin", SPINNER, manifest))
    server.deploy(fn_dir("quick", "def handle(req, ctx):\n    return 'quick'\n"))
    with cf.ThreadPoolExecutor(1) as pool:
        spinning = pool.submit(server.http.get, "/fn/spin", params={"seconds": "1.5"})
        wait_for(lambda: _info(server, "spin")["instances"]["busy"] == 1, 10, "the spinner")
        assert server.http.get("/fn/quick").text == "quick", "others answer meanwhile"
        got = spinning.result().json()
    assert got["cpu"] < 0.25 * got["wall"] + 0.15, f"held to 0.25 cores: {got}"
    procs = named("ember-spin")
    [instance] = [p for p in procs if p.ppid() in {q.pid for q in procs}]  # the one that spun
    [zygote] = [p for p in procs if p is not instance]
    resp = server.http.get("/fn/spin", params={"seconds": "60"})
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "timeout"
    assert "timed out after 3 s" in resp.json()["error"]["message"]
    wait_for(lambda: not alive(instance), 10, "the spinning instance to be killed")
    assert alive(zygote)


def test_without_the_sandbox_the_server_says_so_and_require_isolation_refuses(
    server_factory: Callable[..., EmberServer], tmp_path: Path
):
    refused = subprocess.run(
        [
            *ember_cmd(),
            "up",
            "--home",
            str(tmp_path / "h1"),
            "--port",
            "0",
            "--no-sandbox",
            "--require-isolation",
        ],
        capture_output=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert b"--require-isolation" in refused.stderr and b"mount namespace" in refused.stderr
    plain = server_factory("--no-sandbox")
    doctor = plain.api.get("/api/v1/doctor").json()["checks"]
    off = {c["name"]: c for c in doctor}
    assert not off["mount namespace"]["ok"] and "turned off" in off["mount namespace"]["detail"]
    assert "seccomp" in plain.output() and "off" in plain.output()


def _check_sandboxed(server: EmberServer, fn_dir: Callable[..., Path]) -> dict:
    server.deploy(fn_dir("spy-a", SPY, files={"only-a.txt": b"a"}))
    server.deploy(fn_dir("spy-b", SPY))
    state = [str(server.home), str(server.home / "ember.db"), str(server.home / "credentials")]
    a = _spy(server, "spy-a", tmp="from-a", read=",".join(state), nr=_raw_syscalls())
    b = _spy(server, "spy-b", exists=",".join([*state, "/tmp/from-a"]))
    assert "only-a.txt" in a["code"] and "only-a.txt" not in b["code"]
    assert not any(a["read"].values()) and not any(b["exists"].values())
    assert a["pids"][0] == 1 and len(a["pids"]) <= 3
    assert a["code_write"] == "EROFS" and a["usr_write"] == "EROFS"
    for call in ("mount", "unshare_user", "ptrace", "keyctl", "bpf", "reboot"):
        assert a[call] == "EPERM", (call, a[call])
    return a


def test_sandbox_userns_as_root_is_refused_with_a_reason(tmp_path: Path):
    """As root the root sandbox is the stronger one; asking for userns explicitly is refused
    rather than silently run without a sandbox."""
    done = subprocess.run(
        [*ember_cmd(), "up", "--home", str(tmp_path / "h"), "--port", "0", "--sandbox", "userns"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode != 0 and b"--sandbox userns is for servers without root" in done.stderr


def _unprivileged(uid: int) -> list[str]:
    """A wrapper that runs a command as `uid` with no capabilities. Directories on the way to the
    interpreter that only root may enter (pyenv under /root) are made passable in a private
    mount namespace of the wrapper, so the host is left as it was."""
    needed = {os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix)}
    needed.add(str(Path(__file__).resolve().parents[2]))
    lines = ["set -e"]
    done: set[str] = set()
    for path in sorted(needed):
        parts = Path(path).parts
        for depth in range(1, len(parts) - 1):
            parent = str(Path(*parts[: depth + 1]))
            if parent in done or os.stat(parent).st_mode & 0o001:
                continue
            done.add(parent)
            child = parts[depth + 1]
            aside = f"/tmp/.ember-aside-{len(done)}"
            lines += [
                f"mkdir -p {aside}",
                f"mount --bind {parent} {aside}",
                f"mount -t tmpfs -o mode=755 tmpfs {parent}",
                f"mkdir -p {parent}/{child}",
                f"mount --bind {aside}/{child} {parent}/{child}",
            ]
    lines.append(f'exec setpriv --reuid={uid} --regid={uid} --clear-groups --inh-caps=-all "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines), "sh"]


def test_an_unprivileged_server_sandboxes_with_user_namespaces_or_says_why_not(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    home = Path(tempfile.mkdtemp(prefix="ember-unpriv-"))
    os.chown(home, 65534, 65534)
    try:
        server = server_factory(home=home, prefix=_unprivileged(65534))
        checks = {c["name"]: c for c in server.api.get("/api/v1/doctor").json()["checks"]}
        assert not checks["unprivileged uid"]["ok"], "one uid outside for every tenant"
        assert "RLIMIT_AS" in checks["memory limit"]["detail"]
        needs(checks["mount namespace"]["ok"], checks["mount namespace"]["detail"])
        got = _check_sandboxed(server, fn_dir)
        assert got["uid"] >= 900_000, "the tenant's uid inside its namespace"
        refused = subprocess.run(
            [
                *_unprivileged(65534),
                *ember_cmd(),
                "up",
                "--home",
                str(home / "h2"),
                "--port",
                "0",
                "--require-isolation",
            ],
            capture_output=True,
            timeout=60,
        )
        assert refused.returncode != 0 and b"unprivileged uid" in refused.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_an_import_over_the_memory_limit_is_rejected_naming_it(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    code = "BALLAST = bytearray(96 * 1024 * 1024)\ndef handle(req, ctx):\n    return 'x'\n"
    out = server.cli(
        "deploy", str(fn_dir("heavy", code, "functions:\n  heavy:\n    memory: 64\n")), check=False
    )
    assert out.returncode == 3 and b"more than memory: 64 MB" in out.stderr, out.stderr


BURSTY = "import time\ndef handle(req, ctx):\n    time.sleep(0.5)\n    return 'ok'\n"


def test_a_burst_of_forks_does_not_kill_the_zygote(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    """Regression: new instances are charged to the zygote's cgroup until the server moves
    them out; 60 at once used to fill it and the OOM killer took pid 1 and everything."""
    manifest = "functions:\n  bursty:\n    memory: 64\n    scale: {max: 60}\n"
    server.deploy(fn_dir("bursty", BURSTY, manifest))
    with cf.ThreadPoolExecutor(60) as pool:
        codes = list(pool.map(lambda _: server.http.get("/fn/bursty").status_code, range(60)))
    assert codes == [200] * 60


HOG_LATER = """
import ctypes, os, threading, time
ctypes.CDLL(None).prctl(15, b"ember-hog", 0, 0, 0)  # PR_SET_NAME: how the test finds it

def _grow():
    while not os.path.exists("/tmp/grow"):  # an instance says when: after the import
        time.sleep(0.02)
    global BALLAST
    BALLAST = [bytearray(16 * 1024 * 1024) for _ in range(40)]  # 640 MB

threading.Thread(target=_grow, daemon=True).start()

def handle(req, ctx):
    open("/tmp/grow", "w").close()  # the sandbox's /tmp, shared with the zygote
    return "ok"
"""


def test_a_thread_in_the_zygote_cannot_use_the_room_kept_for_new_instances(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    """Regression: the zygote's cgroup held memory x (scale.max + 1); a thread started at import
    could fill it after the import-time check."""
    manifest = "functions:\n  hog-later:\n    memory: 64\n    scale: {max: 20}\n"
    server.deploy(fn_dir("hog-later", HOG_LATER, manifest))
    [zygote] = named("ember-hog")  # the deploy's probe, kept for requests
    assert server.http.get("/fn/hog-later").text == "ok"  # its thread starts growing
    biggest = 0

    def stopped() -> bool:  # its memory cgroup's OOM killer ends it when the thread grows
        nonlocal biggest
        biggest = max(biggest, _rss_mb(zygote))
        return not alive(zygote)

    wait_for(stopped, 30, "the growing zygote to be stopped at its memory limit")
    assert biggest < 64 + 80 + 40, f"the zygote held {biggest} MB"


def _nspids(proc: psutil.Process) -> list[int]:
    """The process's pid in each pid namespace it is in, outermost first (`NSpid:`)."""
    with open(f"/proc/{proc.pid}/status") as f:
        line = next(line for line in f if line.startswith("NSpid:"))
    return [int(pid) for pid in line.split()[1:]]


def test_no_process_waits_outside_a_sandbox(server: EmberServer, fn_dir: Callable[..., Path]):
    """The process that forks a zygote into its pid namespace and places it in its cgroups
    exits once done: each zygote (and the spare) is a child of the root zygote and pid 1 of a
    namespace of its own; every other process below the root is inside a sandbox."""
    for name in ("tree-a", "tree-b"):
        server.deploy(fn_dir(name, f"def handle(req, ctx):\n    return '{name}'\n"))
        assert server.http.get(f"/fn/{name}").text == name
    assert server.proc is not None
    root = next(
        p
        for p in psutil.Process(server.proc.pid).children()
        if "ember.runtime.root" in " ".join(p.cmdline())
    )
    wait_for(lambda: len(root.children()) >= 3, 10, "two zygotes and the spare")
    top = root.children()
    assert all(_nspids(p)[1:] == [1] for p in top), [(p.pid, _nspids(p)) for p in top]
    below = [p for p in root.children(recursive=True) if p not in top]
    assert len(below) >= 2, "the two instances"
    assert all(len(_nspids(p)) == 2 for p in below), [(p.pid, _nspids(p)) for p in below]
