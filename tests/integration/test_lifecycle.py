"""Deploys, revisions, start tiers, scaling to zero and back, restarts and shutdown."""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import signal
import socket
import tarfile
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import GATED, EmberServer, Gate, wait_for

HELLO = "def handle(req, ctx):\n    return {'v': 1}\n"
HELLO2 = "def handle(req, ctx):\n    return {'v': 2}\n"


def _tree(server: EmberServer) -> list[psutil.Process]:
    assert server.proc is not None
    return psutil.Process(server.proc.pid).children(recursive=True)


def test_restart_keeps_functions_and_they_serve_without_redeploy(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path], tmp_path: Path
):
    home = tmp_path / "home"
    first = server_factory(home=home)
    first.deploy(fn_dir("keep", HELLO))
    assert first.http.get("/fn/keep").json() == {"v": 1}
    assert first.stop() == 0
    second = server_factory(home=home)
    resp = second.http.get("/fn/keep")
    assert resp.status_code == 200 and resp.json() == {"v": 1}
    assert resp.headers["x-ember-start"] == "specialize"
    assert resp.headers["x-ember-revision"] == "1"
    wait_for(
        lambda: (
            len(second.api.get("/api/v1/functions/keep/activations").json()["activations"]) == 2
        ),
        5,
        "both servers' activation records",
    )


def test_tiers_fresh_after_the_root_zygote_dies(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    server = server_factory()
    server.deploy(fn_dir("tiers", HELLO))
    assert server.http.get("/fn/tiers").headers["x-ember-start"] == "fork"
    root = next(p for p in _tree(server) if "ember.runtime.root" in " ".join(p.cmdline()))
    below = root.children(recursive=True)
    assert below, "the function zygote and its instance"
    root.kill()
    root.wait(5)
    wait_for(
        lambda: not any(p.is_running() and p.status() != "zombie" for p in below),
        5,
        "zygotes and instances to die with the root zygote",
    )
    resp = server.http.get("/fn/tiers")
    assert resp.status_code == 200 and resp.headers["x-ember-start"] == "fresh"


def test_scale_to_zero_and_back(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    server = server_factory()
    server.deploy(fn_dir("zero", HELLO, "functions:\n  zero:\n    scale: {idle: 500ms}\n"))
    assert server.http.get("/fn/zero").headers["x-ember-start"] == "fork"
    info = lambda: server.api.get("/api/v1/functions/zero").json()  # noqa: E731
    assert info()["instances"]["idle"] == 1
    wait_for(lambda: info()["instances"]["idle"] == 0, 10, "the idle instance to be reaped")
    assert info()["zygote"] is True
    # The autoscaler took it to zero: a spare instance stands in, handed over to the next start.
    wait_for(lambda: info()["instances"].get("spare", 1) == 1, 5, "the spare instance")
    again = server.http.get("/fn/zero")
    assert again.headers["x-ember-start"] == "spare"
    server.cli("scale", "zero", "--instances", "3")
    assert info()["instances"]["idle"] == 3
    server.cli("scale", "zero", "--instances", "0")
    wait_for(lambda: info()["instances"]["idle"] == 0, 5, "instances to stop")
    assert server.http.get("/fn/zero").headers["x-ember-start"] == "fork"


def test_scale_min_keeps_instances_warm(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    server = server_factory()
    server.deploy(fn_dir("warm", HELLO, "functions:\n  warm:\n    scale: {min: 2, idle: 0.2}\n"))
    server.deploy(fn_dir("witness", HELLO, "functions:\n  witness:\n    scale: {idle: 0.2}\n"))
    info = lambda name: server.api.get(f"/api/v1/functions/{name}").json()  # noqa: E731
    wait_for(lambda: info("warm")["instances"]["idle"] == 2, 5, "two warm instances")
    assert server.http.get("/fn/warm").headers["x-ember-start"] == "warm"
    # The same idle grace, begun later: once the scaler has taken the witness to zero, it has
    # taken warm as low as it goes.
    assert server.http.get("/fn/witness").status_code == 200
    wait_for(lambda: info("witness")["instances"]["idle"] == 0, 10, "the witness to scale to zero")
    warm = info("warm")
    assert warm["instances"]["idle"] == 2 and warm["autoscaler"]["desired"] == 2, warm


def test_failed_deploy_keeps_the_previous_revision(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    server = server_factory()
    directory = fn_dir("safe", HELLO)
    server.deploy(directory)
    (directory / "handler.py").write_text("import nonexistent_module_xyz\n")
    bad = server.cli("deploy", str(directory), check=False)
    assert bad.returncode == 3
    assert b"nonexistent_module_xyz" in bad.stderr
    (directory / "handler.py").write_text("raise RuntimeError('init failed')\n")
    resp = server.api.post(
        "/api/v1/deploy",
        params={"name": "safe"},
        content=_tar({"handler.py": b"raise RuntimeError('init failed')\n"}),
    )
    assert resp.status_code == 422
    assert "init failed" in resp.json()["error"]["detail"]
    assert server.http.get("/fn/safe").json() == {"v": 1}
    revs = server.api.get("/api/v1/functions/safe/revisions").json()["revisions"]
    assert [r["number"] for r in revs] == [1]


def test_redeploy_identical_makes_no_revision_and_new_code_does(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    server = server_factory()
    directory = fn_dir("rev", HELLO)
    server.deploy(directory)
    out = server.deploy(directory)
    assert b"unchanged" in out.stdout
    (directory / "handler.py").write_text(HELLO2)
    server.deploy(directory)
    resp = server.http.get("/fn/rev")
    assert resp.json() == {"v": 2} and resp.headers["x-ember-revision"] == "2"
    (directory / "ember.yaml").write_text("functions:\n  rev:\n    memory: 256\n")
    server.deploy(directory)
    assert server.http.get("/fn/rev").headers["x-ember-revision"] == "3"


def test_stack_file_deploys_several_functions(
    server_factory: Callable[..., EmberServer], tmp_path: Path
):
    server = server_factory()
    root = tmp_path / "stack"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "main.py").write_text(
            f"import os\ndef run(req, ctx):\n    return [{name!r}, os.environ['GREETING']]\n"
        )
    (root / "ember.yaml").write_text(
        "functions:\n"
        "  fn-a: {source: a, handler: main.run, env: {GREETING: hi}}\n"
        "  fn-b: {source: b, handler: main.run, env: {GREETING: yo}, timeout: 2m}\n"
    )
    server.deploy(root)
    assert server.http.get("/fn/fn-a").json() == ["a", "hi"]
    assert server.http.get("/fn/fn-b").json() == ["b", "yo"]
    spec = server.api.get("/api/v1/functions/fn-b").json()["spec"]
    assert spec["timeout"] == 120.0


@pytest.mark.parametrize(
    ("sig", "group"), [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["sigterm", "ctrl-c"]
)
def test_graceful_shutdown_finishes_in_flight_requests(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path], sig: int, group: bool
):
    server = server_factory()
    # held at the gate until the server stops accepting, then still a second of work: well
    # past uvicorn's first 0.1 s of shutdown, within the grace period (30 s)
    slow = GATED + "\ndef handle(req, ctx):\n    gate(req)\n    time.sleep(1)\n    return 'done'\n"
    server.deploy(fn_dir("slow", slow))
    assert server.proc is not None
    with Gate() as gate, cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.http.get, f"/fn/slow?gate={gate.port}")
        gate.wait(1)  # in flight
        children = _tree(server)
        if group:
            os.killpg(server.proc.pid, sig)
        else:
            server.proc.send_signal(sig)
        wait_for(lambda: not _accepting(server), 30, "the server to stop accepting")
        gate.open()  # the request goes on only now, during the shutdown
        resp = pending.result()
        assert server.proc.wait(30) == 0
    assert resp.status_code == 200 and resp.text == "done"
    wait_for(
        lambda: not any(p.is_running() and p.status() != "zombie" for p in children),
        5,
        "zygotes and instances to exit",
    )


def _accepting(server: EmberServer) -> bool:
    try:
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        return True
    except ConnectionRefusedError:
        return False


def test_nothing_outlives_a_killed_server(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    server = server_factory()
    server.deploy(fn_dir("orphan", HELLO))
    server.http.get("/fn/orphan")
    children = _tree(server)
    assert len(children) >= 3  # root zygote, function zygote, instance
    server.stop(signal.SIGKILL)
    wait_for(
        lambda: not any(p.is_running() and p.status() != "zombie" for p in children),
        5,
        "every zygote and instance to die with the server",
    )


def test_bad_input_is_refused_with_4xx_and_nothing_stored(
    server_factory: Callable[..., EmberServer],
):
    server = server_factory()
    hello = HELLO.encode()
    cases = {  # what is sent: the error code and words of the message that say what is wrong
        "garbage": (b"not a tarball", "bad_bundle", "not a valid tar.gz"),
        "traversal": (_tar({"../evil.py": b"x"}), "bad_bundle", "'..'"),
        "bad yaml": (
            _tar({"handler.py": hello, "ember.yaml": b"functions: [\n"}),
            "bad_manifest",
            "not valid YAML",
        ),
        "no handler": (_tar({"other.py": b"x = 1\n"}), "bad_manifest", "no ./handler.py"),
        "bad name": (
            _tar({"handler.py": hello, "ember.yaml": b"functions:\n  Bad_Name: {}\n"}),
            "bad_manifest",
            "'Bad_Name' is invalid",
        ),
        "unknown key": (
            _tar({"handler.py": hello, "ember.yaml": b"functions:\n  ok:\n    memroy: 1\n"}),
            "bad_manifest",
            "functions.ok.memroy: unknown key",
        ),
        "link": (
            _tar({"handler.py": hello}, link=("escape", "/etc/passwd")),
            "bad_bundle",
            "'escape' is a symbolic link",
        ),
    }
    for case, (body, code, words) in cases.items():
        resp = server.api.post("/api/v1/deploy", params={"name": "victim"}, content=body)
        assert resp.status_code == 400, (case, resp.status_code, resp.text)
        error = resp.json()["error"]
        assert error["code"] == code and words in error["message"], (case, error)
    assert server.api.get("/api/v1/functions").json()["functions"] == []
    code_dir = server.home / "code"  # what was unpacked is deleted in the background
    wait_for(lambda: not code_dir.exists() or not any(code_dir.iterdir()), 10, "no code directory")
    assert server.api.post("/api/v1/deploy", content=b"").status_code == 400
    resp = server.api.post("/api/v1/functions/nope/scale", json={"instances": 1})
    assert resp.status_code == 404
    resp = server.api.post(
        "/api/v1/deploy", params={"name": "x"}, content=_tar({"handler.py": HELLO.encode()})
    )
    assert resp.status_code == 201
    bad_scale = server.api.post("/api/v1/functions/x/scale", content=b"{nope")
    assert bad_scale.status_code == 400
    assert server.api.get("/api/v1/nothing").status_code == 404
    odd = server.api.get("/api/v1/functions/x/activations", params={"limit": "²"})
    assert odd.status_code == 400


def test_api_documents_itself_and_exports_metrics(
    server_factory: Callable[..., EmberServer], fn_dir: Callable[..., Path]
):
    server = server_factory()
    server.deploy(fn_dir("metered", HELLO))
    server.http.get("/fn/metered")
    server.http.get("/fn/metered")
    doc = server.api.get("/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert "/api/v1/functions/{name}/scale" in doc["paths"]
    assert "FunctionInfo" in doc["components"]["schemas"]
    text = server.http.get("/metrics").text
    assert 'ember_invocations_total{code="200",function="metered",namespace="default"} 2.0' in text
    assert 'ember_starts_total{function="metered",namespace="default",tier="fork"} 1.0' in text
    assert 'ember_starts_total{function="metered",namespace="default",tier="warm"} 1.0' in text
    assert (
        'ember_invocation_duration_seconds_count{function="metered",namespace="default"} 2.0'
        in text
    )
    assert 'ember_instances{function="metered",namespace="default",state="idle"} 1.0' in text


def _tar(files: dict[str, bytes], link: tuple[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link[0])
            info.type = tarfile.SYMTYPE
            info.linkname = link[1]
            tar.addfile(info)
    return buf.getvalue()
