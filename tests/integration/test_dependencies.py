"""Functions with requirements: resolved at deploy into a lock, installed once into a shared
read-only layer, seen by the function on its sys.path; bad requirements refused with 422 and
nothing changed. Packages come from a wheelhouse the tests make (offline), and once from the
registry CI reaches."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ember import bundle
from tests.integration.conftest import EmberServer, make_function
from tests.wheels import make_built_sdist, make_sdist, make_wheel

pytestmark = pytest.mark.integration

REPORT = """
import os, sys
import emberdep_alpha

def handle(req, ctx):
    out = {"alpha": emberdep_alpha.__version__, "alpha_file": emberdep_alpha.__file__,
           "path": sys.path[:2]}
    try:
        import emberdep_beta
        out["beta"] = emberdep_beta.__version__
    except ImportError:
        out["beta"] = None
    try:
        with open(emberdep_alpha.__file__, "a") as f:
            f.write("# changed")
        out["write"] = "written"
    except OSError as exc:
        out["write"] = exc.errno
    out["read_only_mount"] = bool(os.statvfs(os.path.dirname(emberdep_alpha.__file__)).f_flag
                                  & os.ST_RDONLY)
    import importlib.util
    out["importable"] = {name: importlib.util.find_spec(name) is not None
                         for name in ("starlette", "httpx", "yaml", "msgspec")}
    return out
"""


@pytest.fixture(scope="module")
def house(tmp_path_factory: pytest.TempPathFactory) -> Path:
    h = tmp_path_factory.mktemp("wheelhouse")
    make_wheel(h, "emberdep-alpha", "1.0.0")
    make_wheel(h, "emberdep-alpha", "2.0.0")
    make_wheel(h, "emberdep-beta", "0.3.0", requires=("emberdep-alpha>=2",))
    make_sdist(h, "emberdep-source", "1.0")
    # used by one test each, so that what they see installed is theirs alone
    for name, version in [("stream", "1.0"), ("cli", "1.0"), ("logs", "1.0"), ("logs", "2.0")]:
        make_wheel(h, f"emberdep-{name}", version)
    make_wheel(h, "emberdep-big", "1.0", payload_bytes=3 * 1024 * 1024)
    return h


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, house: Path) -> Iterator[EmberServer]:
    home = tmp_path_factory.mktemp("ember-deps")
    s = EmberServer(home, ["--find-links", str(house), "--no-index", "--no-source-builds"]).start()
    yield s
    s.stop()
    s.http.close()
    s.api.close()


@pytest.fixture
def fn(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str, requirements: str | None, code: str = REPORT, **files: str) -> Path:
        extra = {k.replace("__", "."): v.encode() for k, v in files.items()}
        if requirements is not None:
            extra["requirements.txt"] = requirements.encode()
        else:  # the directory may be there from an earlier deploy of the test
            (tmp_path / "src" / name / "requirements.txt").unlink(missing_ok=True)
        return make_function(tmp_path / "src", name, code, files=extra)

    return make


def deploy(srv: EmberServer, directory: Path, name: str) -> httpx.Response:
    return srv.api.post(
        "/api/v1/deploy",
        params={"name": name},
        content=bundle.pack(directory),
        headers={"Content-Type": "application/gzip"},
    )


def layers(srv: EmberServer) -> list[str]:
    root = srv.home / "layers"
    return sorted(p.name for p in root.iterdir() if re.fullmatch(r"[0-9a-f]{64}", p.name))


def leftovers(srv: EmberServer) -> list[str]:
    return sorted(p.name for p in (srv.home / "layers").iterdir() if p.name.startswith(".tmp-"))


def test_requirements_run_from_a_read_only_layer_after_the_code(
    srv: EmberServer, fn: Callable[..., Path]
) -> None:
    r = deploy(srv, fn("dep-beta", "emberdep-beta\n"), "dep-beta")
    assert r.status_code == 201, r.text
    (info,) = r.json()["functions"]
    assert info["layer"]["built"] is True
    assert info["layer"]["packages"] == ["emberdep-alpha==2.0.0", "emberdep-beta==0.3.0"]
    out = srv.http.get("/fn/dep-beta").json()
    assert (out["alpha"], out["beta"]) == ("2.0.0", "0.3.0")  # beta's dependency came along
    # forked from its layer zygote: its code at /code/<revision digest> (docs/dependencies.md)
    assert re.fullmatch(r"/code/[0-9a-f]{32}/\.", out["path"][0]) and out["path"][1] == "/layer"
    assert out["alpha_file"] == "/layer/emberdep_alpha/__init__.py"
    assert out["write"] == errno.EACCES  # not the tenant's files, and not writable by anyone
    assert out["read_only_mount"] is True
    # the server's environment is not the function's: only the runtime's own set shows
    assert out["importable"] == {"starlette": False, "httpx": False, "yaml": False, "msgspec": True}
    site = srv.home / "layers" / info["layer"]["digest"] / "site"
    assert (site / "emberdep_alpha" / "__init__.py").read_text().startswith("__version__")
    assert list((site / "emberdep_alpha" / "__pycache__").glob("*.pyc"))  # compiled at build
    # hard links into uv's cache: a write through any copy would change every one
    assert (site / "emberdep_alpha" / "__init__.py").stat().st_mode & 0o222 == 0


def test_the_same_lock_is_installed_once_and_shared(
    srv: EmberServer, fn: Callable[..., Path]
) -> None:
    first = deploy(srv, fn("share-1", "emberdep-alpha==1.0.0\n"), "share-1").json()["functions"]
    digest = first[0]["layer"]["digest"]
    site = srv.home / "layers" / digest / "site"
    inode = site.stat().st_ino
    for i in (2, 3):
        r = deploy(srv, fn(f"share-{i}", "emberdep-alpha==1.0.0  # pinned\n"), f"share-{i}")
        (info,) = r.json()["functions"]
        assert info["layer"]["digest"] == digest
        assert info["layer"]["built"] is False
        assert srv.http.get(f"/fn/share-{i}").json()["alpha"] == "1.0.0"
    assert site.stat().st_ino == inode  # the very same directory: nothing installed again
    assert layers(srv).count(digest) == 1


def test_two_functions_get_their_own_versions_of_one_package(
    srv: EmberServer, fn: Callable[..., Path]
) -> None:
    assert deploy(srv, fn("v-one", "emberdep-alpha<2\n"), "v-one").status_code == 201
    assert deploy(srv, fn("v-two", "emberdep-alpha>=2\n"), "v-two").status_code == 201
    assert srv.http.get("/fn/v-one").json()["alpha"] == "1.0.0"
    assert srv.http.get("/fn/v-two").json()["alpha"] == "2.0.0"


def test_a_function_without_requirements_sees_no_layer(
    srv: EmberServer, fn: Callable[..., Path]
) -> None:
    code = "import sys\ndef handle(req, ctx):\n    return {'path': sys.path[:2]}\n"
    r = deploy(srv, fn("plain-fn", None, code=code), "plain-fn")
    assert r.json()["functions"][0]["layer"] is None
    assert "/layer" not in srv.http.get("/fn/plain-fn").json()["path"]


@pytest.mark.parametrize(
    ("requirements", "status", "code", "names"),
    [
        ("emberdep-alpha\nno-such-package-here\n", 422, "requirements_unresolvable", "line 2"),
        ("emberdep-alpha>=3\n", 422, "requirements_unresolvable", "emberdep-alpha>=3"),
        ("emberdep-source\n", 422, "requirements_unresolvable", "--no-source-builds"),
        (
            "emberdep-alpha\n--index-url https://example.invalid/simple\n",
            422,
            "bad_requirements",
            "line 2",
        ),
        ("emberdep-alpha @ https://example.invalid/a.whl\n", 422, "bad_requirements", "by URL"),
        ("./vendor/emberdep_alpha-1.0.0-py3-none-any.whl\n", 422, "bad_requirements", "line 1"),
        ("msgspec==0.18\n", 422, "runtime_conflict", "msgspec"),
        ("emberdep-alpha\nemberdep-alpha<2\n", 422, "bad_requirements", "already required"),
    ],
)
def test_bad_requirements_are_refused_and_the_previous_revision_keeps_serving(
    srv: EmberServer,
    fn: Callable[..., Path],
    requirements: str,
    status: int,
    code: str,
    names: str,
) -> None:
    name = "keeps-" + hashlib.sha256(requirements.encode()).hexdigest()[:8]
    assert deploy(srv, fn(name, "emberdep-alpha==1.0.0\n"), name).status_code == 201
    before = layers(srv)
    r = deploy(srv, fn(name, requirements, code=REPORT + "\n# v2\n"), name)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert "requirements.txt" in error["message"] and names in error["message"]
    assert srv.http.get(f"/fn/{name}").json()["alpha"] == "1.0.0"
    assert srv.api.get(f"/api/v1/functions/{name}").json()["revision"] == 1
    assert layers(srv) == before and leftovers(srv) == []


def test_pyproject_dependencies_are_requirements_too(
    srv: EmberServer, fn: Callable[..., Path]
) -> None:
    pyproject = '[project]\nname = "x"\nversion = "0"\ndependencies = ["emberdep-alpha<2"]\n'
    r = deploy(srv, fn("from-pyproject", None, pyproject__toml=pyproject), "from-pyproject")
    assert r.json()["functions"][0]["layer"]["packages"] == ["emberdep-alpha==1.0.0"]
    assert srv.http.get("/fn/from-pyproject").json()["alpha"] == "1.0.0"


def test_the_cli_shows_the_layer(srv: EmberServer, fn: Callable[..., Path]) -> None:
    out = srv.deploy(fn("cli-dep", "emberdep-alpha==2.0.0\n")).stdout.decode()
    assert "requirements: 1 package(s)" in out


def test_a_restart_serves_from_the_layers_it_has(
    house: Path, fn: Callable[..., Path], server_factory: Callable[..., EmberServer], tmp_path: Path
) -> None:
    args = ("--find-links", str(house), "--no-index")
    first = server_factory(*args, home=tmp_path / "home")
    assert deploy(first, fn("survives", "emberdep-beta\n"), "survives").status_code == 201
    (digest,) = layers(first)
    built = (first.home / "layers" / digest / "layer.json").stat().st_mtime_ns
    assert first.stop() == 0
    os.rename(house, house.with_name("gone"))  # nothing to install from after the restart
    try:
        second = server_factory(*args, home=tmp_path / "home")
        assert second.http.get("/fn/survives").json()["beta"] == "0.3.0"
    finally:
        os.rename(house.with_name("gone"), house)
    assert layers(second) == [digest]
    assert (second.home / "layers" / digest / "layer.json").stat().st_mtime_ns == built


def test_layers_no_kept_revision_uses_are_removed(
    house: Path, fn: Callable[..., Path], server_factory: Callable[..., EmberServer], tmp_path: Path
) -> None:
    srv = server_factory("--find-links", str(house), "--no-index", "--revision-retention", "1")
    assert deploy(srv, fn("gc", "emberdep-alpha==1.0.0\n"), "gc").status_code == 201
    (old,) = layers(srv)
    assert deploy(srv, fn("gc", "emberdep-alpha==2.0.0\n"), "gc").status_code == 201
    assert old in layers(srv)  # revision 1 is the previous one: a rollback needs its layer
    code = "def handle(req, ctx):\n    return 'no requirements'\n"
    assert deploy(srv, fn("gc", None, code=code), "gc").status_code == 201
    assert old not in layers(srv)  # revision 1 went: so did its layer
    assert len(layers(srv)) == 1  # revision 2's, the previous one now
    srv.cli("rm", "gc")
    assert srv.stop(signal.SIGTERM) == 0
    again = server_factory("--find-links", str(house), "--no-index", home=srv.home)
    assert layers(again) == []  # the start's sweep: no revision uses any


def test_a_package_from_the_registry(
    fn: Callable[..., Path], server_factory: Callable[..., EmberServer]
) -> None:
    """The one test that reaches the network: CI reaches the package registries."""
    srv = server_factory()
    code = "import six\ndef handle(req, ctx):\n    return {'six': six.__version__}\n"
    r = deploy(srv, fn("from-pypi", "six==1.16.0\n", code=code), "from-pypi")
    assert r.status_code == 201, r.text
    assert srv.http.get("/fn/from-pypi").json() == {"six": "1.16.0"}


def test_without_the_sandbox_the_layer_is_on_the_path_where_it_is(
    house: Path, fn: Callable[..., Path], server_factory: Callable[..., EmberServer]
) -> None:
    srv = server_factory("--find-links", str(house), "--no-index", "--sandbox", "off")
    r = deploy(srv, fn("unboxed", "emberdep-alpha==2.0.0\n"), "unboxed")
    site = srv.home / "layers" / r.json()["functions"][0]["layer"]["digest"] / "site"
    out = srv.http.get("/fn/unboxed").json()
    assert out["path"][1] == str(site)
    assert out["alpha_file"] == str(site / "emberdep_alpha" / "__init__.py")


def test_the_api_and_doctor_show_the_layers_and_their_size(
    house: Path, fn: Callable[..., Path], server_factory: Callable[..., EmberServer]
) -> None:
    srv = server_factory("--find-links", str(house), "--no-index")
    for name in ("size-1", "size-2"):
        assert deploy(srv, fn(name, "emberdep-alpha==1.0.0\n"), name).status_code == 201
    assert deploy(srv, fn("size-3", "emberdep-beta\n"), "size-3").status_code == 201
    listed = srv.api.get("/api/v1/layers").json()
    on_disk = {
        p.name: sum(f.stat().st_size for f in (p / "site").rglob("*") if f.is_file())
        for p in (srv.home / "layers").iterdir()
        if len(p.name) == 64
    }
    assert listed["count"] == 2 and listed["bytes"] == sum(on_disk.values())
    by_packages = {tuple(x["packages"]): x for x in listed["layers"]}
    assert by_packages[("emberdep-alpha==1.0.0",)]["revisions"] == 2
    beta = by_packages[("emberdep-alpha==2.0.0", "emberdep-beta==0.3.0")]
    assert beta["revisions"] == 1 and beta["bytes"] == on_disk[beta["digest"]]
    reader = srv.api.post("/api/v1/keys", json={"name": "r", "scopes": ["read:default"]})
    headers = {"Authorization": f"Bearer {reader.json()['key']}"}
    assert srv.http.get("/api/v1/layers", headers=headers).status_code == 403  # spans tenants
    # one layer zygote per function (docs/dependencies.md), whatever their layers
    assert sorted(z["function"] for z in listed["zygotes"]) == ["size-1", "size-2", "size-3"]
    doctor = json.loads(srv.cli("doctor", "--json").stdout)
    del doctor["layers"]["zygotes_kb"]  # measured meanwhile, or not yet
    assert doctor["layers"] == {"count": 2, "bytes": listed["bytes"], "zygotes": 3}


def test_a_streamed_deploy_reports_each_step_then_its_outcome(
    srv: EmberServer, fn: Callable[..., Path]
) -> None:
    def stream(name: str, requirements: str) -> list[dict[str, object]]:
        with srv.api.stream(
            "POST",
            "/api/v1/deploy",
            params={"name": name},
            content=bundle.pack(fn(name, requirements)),
            headers={"Content-Type": "application/gzip", "Accept": "application/x-ndjson"},
        ) as r:
            assert r.headers["content-type"].startswith("application/x-ndjson")
            return [json.loads(line) for line in r.iter_lines() if line]

    events = stream("streamed", "emberdep-alpha>=2\nemberdep-stream\n")
    assert [(e["event"], e.get("phase")) for e in events] == [
        ("DeployProgress", "resolving"),
        ("DeployProgress", "resolved"),
        ("DeployProgress", "installing"),
        ("DeployProgress", "installed"),
        ("DeployProgress", "importing"),
        ("DeployDone", None),
    ]
    assert events[-1]["status"] == 201
    assert events[-1]["result"]["functions"][0]["name"] == "streamed"
    failed = stream("streamed", "emberdep-alpha>=3\n")
    assert [e["event"] for e in failed] == ["DeployProgress", "DeployFailed"]
    assert failed[-1]["status"] == 422
    assert failed[-1]["error"]["code"] == "requirements_unresolvable"


def test_a_large_download_is_shown_with_its_size(
    fn: Callable[..., Path], server_factory: Callable[..., EmberServer], tmp_path: Path
) -> None:
    """uv names downloads over about a megabyte: the deploy streams each, with its size."""
    import http.server
    import threading

    house = tmp_path / "served"
    blob = os.urandom(1_500_000).hex()  # 3 MB of hex digits: a wheel of ~1.7 MB
    make_wheel(house, "emberdep-large", "1.0", extra={"emberdep_large/blob.txt": blob})
    wheel = next(house.glob("*.whl"))

    class Served(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(house), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    index = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Served)
    threading.Thread(target=index.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{index.server_address[1]}/"
        srv = server_factory("--find-links", url, "--no-index")
        with srv.api.stream(
            "POST",
            "/api/v1/deploy",
            params={"name": "large"},
            content=bundle.pack(
                fn("large", "emberdep-large\n", code="def handle(req, ctx):\n    return 1\n")
            ),
            headers={"Content-Type": "application/gzip", "Accept": "application/x-ndjson"},
        ) as r:
            events = [json.loads(line) for line in r.iter_lines() if line]
    finally:
        index.shutdown()
        index.server_close()
    (got,) = [e for e in events if e.get("phase") == "downloading"]
    assert got["packages"] == ["emberdep-large"]
    size = wheel.stat().st_size  # uv says it in MiB with one decimal
    assert abs(got["bytes"] - size) <= 0.05 * 2**20, (got["bytes"], size)
    assert events[-1]["event"] == "DeployDone", events[-1]


def test_the_cli_shows_progress_on_stderr_and_stays_scriptable(
    srv: EmberServer, fn: Callable[..., Path]
) -> None:
    first = srv.deploy(fn("cli-progress", "emberdep-alpha\nemberdep-cli\n"))
    err = first.stderr.decode()
    assert "cli-progress: 2 package(s), resolved in" in err
    assert "emberdep-alpha==2.0.0, emberdep-cli==1.0" in err
    assert "cli-progress: installed and compiled" in err
    assert first.stdout.decode().startswith("deployed cli-progress revision 1")
    again = srv.deploy(fn("cli-progress-2", "emberdep-alpha\nemberdep-cli\n"))
    assert "lock reused" in again.stderr.decode()
    assert "layer already installed" in again.stderr.decode()
    quiet = srv.deploy(fn("cli-quiet", "emberdep-beta\n"), "--quiet")
    assert quiet.stderr == b"" and quiet.stdout.decode().startswith("deployed cli-quiet")
    as_json = srv.deploy(fn("cli-json", "emberdep-beta\n"), "--json")
    assert as_json.stderr == b""
    assert json.loads(as_json.stdout)["functions"][0]["layer"]["built"] is False
    bad = srv.cli("deploy", str(fn("cli-bad", "nope-not-here\n")), check=False)
    assert bad.returncode == 2
    assert "error: function 'cli-bad': resolving requirements.txt failed" in bad.stderr.decode()


def test_builds_lists_each_revisions_build_with_its_log(
    srv: EmberServer, fn: Callable[..., Path]
) -> None:
    code = "import emberdep_logs\n\ndef handle(req, ctx):\n    return emberdep_logs.NAME\n"
    for requirements in ("emberdep-logs==1.0\n", "emberdep-logs==2.0\n"):
        r = deploy(srv, fn("built", requirements, code=code), "built")
        assert r.status_code == 201, r.text
    code = "def handle(req, ctx):\n    return 1\n"
    assert deploy(srv, fn("built", None, code=code), "built").status_code == 201
    builds = srv.api.get("/api/v1/functions/built/builds").json()["builds"]
    assert [(b["revision"], b["packages"]) for b in builds] == [
        (2, ["emberdep-logs==2.0"]),
        (1, ["emberdep-logs==1.0"]),
    ]  # revision 3 has no requirements, so no build
    assert all(b["bytes"] > 0 and b["layer"] in layers(srv) for b in builds)
    table = srv.cli("builds", "built").stdout.decode()
    assert "emberdep-logs==2.0" in table and builds[0]["layer"][:12] in table
    logs = srv.cli("builds", "built", "--log").stdout.decode()
    assert "revision 2" in logs and "$ uv pip install" in logs


def test_a_build_under_way_holds_up_no_other_deploy(
    house: Path, fn: Callable[..., Path], server_factory: Callable[..., EmberServer]
) -> None:
    """Builds run outside the control plane's write lock: while one waits on the package index
    (held here until the test lets it answer), another function deploys and `scale` answers."""
    import http.server
    import threading

    release = threading.Event()
    asked = threading.Event()

    class Index(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(house), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            asked.set()
            release.wait(60)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    index = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=index.serve_forever, daemon=True).start()
    try:
        srv = server_factory(
            "--find-links", f"http://127.0.0.1:{index.server_address[1]}/", "--no-index"
        )
        results: list[httpx.Response] = []
        slow = threading.Thread(
            target=lambda: results.append(
                deploy(srv, fn("waits", "emberdep-alpha==1.0.0\n"), "waits")
            )
        )
        slow.start()
        assert asked.wait(30)  # the build is waiting on the index now
        code = "def handle(req, ctx):\n    return 'meanwhile'\n"
        assert deploy(srv, fn("meanwhile", None, code=code), "meanwhile").status_code == 201
        assert srv.http.get("/fn/meanwhile").text == "meanwhile"
        assert srv.cli("scale", "meanwhile", "-n", "1").returncode == 0
        assert not results  # still building
        release.set()
        slow.join(60)
        assert results[0].status_code == 201, results[0].text
        assert srv.http.get("/fn/waits").json()["alpha"] == "1.0.0"
    finally:
        release.set()
        index.shutdown()
        index.server_close()


def test_a_missing_layer_is_installed_again_from_its_kept_lock(
    house: Path, fn: Callable[..., Path], server_factory: Callable[..., EmberServer], tmp_path: Path
) -> None:
    args = ("--find-links", str(house), "--no-index")
    first = server_factory(*args, home=tmp_path / "home")
    assert deploy(first, fn("rebuilt", "emberdep-beta\n"), "rebuilt").status_code == 201
    (digest,) = layers(first)
    assert first.stop() == 0
    shutil.rmtree(first.home / "layers" / digest)  # e.g. a disk replaced, a careless clean-up
    second = server_factory(*args, home=tmp_path / "home")
    out = second.http.get("/fn/rebuilt").json()
    assert (out["alpha"], out["beta"]) == ("2.0.0", "0.3.0")
    assert layers(second) == [digest]  # the same lock: the same layer


def test_builds_over_their_limits_fail_naming_the_limit(
    house: Path, fn: Callable[..., Path], server_factory: Callable[..., EmberServer]
) -> None:
    srv = server_factory("--find-links", str(house), "--no-index", "--max-layer-mb", "2")
    r = deploy(srv, fn("too-big", "emberdep-big\n"), "too-big")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "layer_too_large"
    assert (
        "over the limit of 2 MB per layer (ember up --max-layer-mb)" in r.json()["error"]["message"]
    )
    assert layers(srv) == [] and leftovers(srv) == []  # nothing half-written


def test_a_build_over_its_time_fails_naming_the_limit(
    house: Path, fn: Callable[..., Path], server_factory: Callable[..., EmberServer]
) -> None:
    """The index never answers: the resolution is stopped at --build-timeout."""
    import socket

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/simple"
        srv = server_factory("--index-url", url, "--build-timeout", "1")
        r = deploy(srv, fn("too-slow", "emberdep-alpha\n"), "too-slow")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "build_timeout"
    assert "took over 1 s, the limit (ember up --build-timeout)" in r.json()["error"]["message"]
    assert srv.api.get("/api/v1/functions/too-slow").status_code == 404


BUILT = """
import emberdep_built

def handle(req, ctx):
    return emberdep_built.SEEN
"""


def test_a_source_distribution_is_built_in_the_namespaces_sandbox(
    fn: Callable[..., Path], server_factory: Callable[..., EmberServer], tmp_path: Path
) -> None:
    """Its build backend runs as the namespace's uid, in a sandbox that shows nothing of
    EMBER_HOME; the layer it made is that namespace's alone."""
    house, home = tmp_path / "sdists", tmp_path / "home"
    make_built_sdist(house, "emberdep-built", "1.0", str(home))
    srv = server_factory("--find-links", str(house), "--no-index", home=home)
    r = deploy(srv, fn("built-here", "emberdep-built\n", code=BUILT), "built-here")
    assert r.status_code == 201, r.text
    assert r.json()["functions"][0]["layer"]["packages"] == ["emberdep-built==1.0"]
    seen = srv.http.get("/fn/built-here").json()
    uid = srv.api.get("/api/v1/namespaces").json()["namespaces"][0]["uid"]
    assert seen == {"uid": uid, "hostname": seen["hostname"], "saw_ember_home": False}
    assert seen["hostname"].startswith("ember-build-")
    builds = srv.api.get("/api/v1/functions/built-here/builds").json()["builds"]
    assert "built from source in a sandbox of namespace default" in builds[0]["log"]
    shown = srv.deploy(fn("built-cli", "emberdep-built==1.0\n", code=BUILT)).stderr.decode()
    assert "built-cli: built from source in the namespace's sandbox in " in shown
    assert "emberdep-built==1.0" in shown


def test_a_layer_built_from_source_is_not_shared_with_another_namespace(
    fn: Callable[..., Path], server_factory: Callable[..., EmberServer], tmp_path: Path
) -> None:
    house, home = tmp_path / "sdists", tmp_path / "home"
    make_built_sdist(house, "emberdep-built", "1.0", str(home))
    srv = server_factory("--find-links", str(house), "--no-index", home=home)
    digests = []
    for namespace in ("default", "team"):
        r = srv.api.post(
            "/api/v1/deploy",
            params={"name": "same", "namespace": namespace},
            content=bundle.pack(fn("same", "emberdep-built==1.0\n", code=BUILT)),
            headers={"Content-Type": "application/gzip"},
        )
        assert r.status_code == 201, r.text
        layer = r.json()["functions"][0]["layer"]
        assert layer["built"] is True  # what one tenant's build made never runs for another
        digests.append(layer["digest"])
    assert digests[0] != digests[1] and sorted(layers(srv)) == sorted(digests)
    again = deploy(srv, fn("same-2", "emberdep-built==1.0\n", code=BUILT), "same-2")
    assert again.json()["functions"][0]["layer"] == {
        **again.json()["functions"][0]["layer"],
        "digest": digests[0],
        "built": False,
    }


@pytest.mark.parametrize(
    ("limit", "extra", "code", "names"),
    [
        (
            ("--build-memory-mb", "128"),
            "hog = b'x' * (400 * 1024 * 1024)",
            "build_over_memory",
            "used over 128 MB of memory, the limit (ember up --build-memory-mb)",
        ),
        (
            ("--build-disk-mb", "16"),
            "open('/tmp/fill', 'wb').write(bytes(64 * 1024 * 1024))",
            "build_over_disk",
            "needed over 16 MB of disk, the limit (ember up --build-disk-mb)",
        ),
        (
            ("--build-timeout", "3"),
            "import time; time.sleep(60)",
            "build_timeout",
            "took over 3 s, the limit (ember up --build-timeout)",
        ),
    ],
)
def test_a_build_from_source_over_a_limit_fails_naming_it(
    fn: Callable[..., Path],
    server_factory: Callable[..., EmberServer],
    tmp_path: Path,
    limit: tuple[str, str],
    extra: str,
    code: str,
    names: str,
) -> None:
    house = tmp_path / "sdists"
    make_built_sdist(house, "emberdep-greedy", "1.0", "/nowhere", extra=extra)
    srv = server_factory("--find-links", str(house), "--no-index", *limit)
    r = deploy(
        srv,
        fn("greedy", "emberdep-greedy\n", code="def handle(req, ctx):\n    return 1\n"),
        "greedy",
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert names in r.json()["error"]["message"]
    assert layers(srv) == [] and leftovers(srv) == []
    assert srv.api.get("/api/v1/functions/greedy").status_code == 404
