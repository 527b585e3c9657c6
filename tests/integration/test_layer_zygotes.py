"""Layer zygotes: a function's requirements imported once in its sandbox; each new revision's
zygote forks from it and imports only its own code. The package the tests install draws a
random token when it is imported: the same token in two revisions means one import."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ember import bundle
from tests.integration.conftest import EmberServer, make_function
from tests.wheels import make_wheel

pytestmark = pytest.mark.integration

COUNTED = """
import os
__version__ = "1.0"
TOKEN = os.urandom(8).hex()
print("emberdep-counted imported")
with open("/tmp/emberdep-counted.log", "a") as f:
    f.write(TOKEN + "\\n")
"""

HOOKED = """
import os
__version__ = "1.0"
CHILDREN = []
os.register_at_fork(after_in_child=lambda: CHILDREN.append(os.getpid()))
"""

HANDLER = """
import os, sys
import emberdep_counted

VERSION = {version!r}

def handle(req, ctx):
    out = {{"version": VERSION, "token": emberdep_counted.TOKEN, "cwd": os.getcwd(),
            "path": sys.path[:2], "file": __file__}}
    with open("/tmp/emberdep-counted.log") as f:
        out["imports"] = f.read().split()
    out["read_only"] = bool(os.statvfs(os.getcwd()).f_flag & os.ST_RDONLY)
    out["code"] = sorted(os.listdir("/code")) if os.path.isdir("/code") else None
    try:
        with open("/run/secrets/token") as f:
            out["secret"] = f.read()
    except OSError:
        out["secret"] = None
    return out
"""


@pytest.fixture(scope="module")
def house(tmp_path_factory: pytest.TempPathFactory) -> Path:
    h = tmp_path_factory.mktemp("wheelhouse")
    make_wheel(h, "emberdep-counted", "1.0", extra={"emberdep_counted/__init__.py": COUNTED})
    make_wheel(h, "emberdep-hooked", "1.0", extra={"emberdep_hooked/__init__.py": HOOKED})
    return h


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, house: Path) -> Iterator[EmberServer]:
    home = tmp_path_factory.mktemp("ember-layer-zygotes")
    s = EmberServer(home, ["--find-links", str(house), "--no-index"]).start()
    yield s
    s.stop()
    s.http.close()
    s.api.close()


def deploy(
    srv: EmberServer, src: Path, name: str, version: int, namespace: str = "default", **extra: str
) -> httpx.Response:
    files = {"requirements.txt": b"emberdep-counted\n"}
    files.update({k: v.encode() for k, v in extra.items()})
    directory = make_function(src, name, HANDLER.format(version=version), files=files)
    return post(srv, directory, name, namespace)


def post(
    srv: EmberServer, directory: Path, name: str, namespace: str = "default"
) -> httpx.Response:
    """`POST /api/v1/deploy` of DIRECTORY's bundle as NAME."""
    return srv.api.post(
        "/api/v1/deploy",
        params={"name": name, "namespace": namespace},
        content=bundle.pack(directory),
        headers={"Content-Type": "application/gzip"},
    )


def call(srv: EmberServer, name: str, namespace: str = "default") -> dict[str, object]:
    path = f"/fn/{name}" if namespace == "default" else f"/fn/{namespace}/{name}"
    r = srv.http.get(path)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def zygotes(srv: EmberServer) -> list[dict[str, object]]:
    r = srv.api.get("/api/v1/layers")
    assert r.status_code == 200, r.text
    return r.json()["zygotes"]  # type: ignore[no-any-return]


def test_a_new_revision_forks_from_the_layer_zygote_and_imports_only_its_code(
    srv: EmberServer, tmp_path: Path
) -> None:
    assert deploy(srv, tmp_path, "lz-one", 1).status_code == 201
    first = call(srv, "lz-one")
    assert deploy(srv, tmp_path, "lz-one", 2).status_code == 201
    second = call(srv, "lz-one")
    assert (first["version"], second["version"]) == (1, 2)
    # one import of the package, in the layer zygote, for both revisions
    assert second["token"] == first["token"]
    assert second["imports"] == [first["token"]]
    (lz,) = [z for z in zygotes(srv) if z["function"] == "lz-one"]
    assert lz["preload"] == ["emberdep_counted"]  # found in the handler's imports
    assert lz["forks"] == 2
    # each revision's code, read-only, where its zygote works
    assert first["cwd"] != second["cwd"]
    assert str(second["cwd"]).startswith("/code/") and second["path"][1] == "/layer"
    assert str(second["file"]).replace("/./", "/") == f"{second['cwd']}/handler.py"
    assert second["read_only"] is True
    # only this function's revisions show under /code
    assert second["code"] == sorted({str(first["cwd"])[6:], str(second["cwd"])[6:]})
    # what the package printed when the layer zygote imported it, once, in the function's log

    def said() -> list[str]:
        r = srv.api.get("/api/v1/functions/lz-one/logs", params={"limit": 1000})
        lines = [json.loads(line)["message"] for line in r.text.splitlines()]
        return [line for line in lines if "emberdep-counted imported" in line]

    until(lambda: bool(said()))
    assert len(said()) == 1


def test_layer_zygotes_are_never_shared_between_functions_or_namespaces(
    srv: EmberServer, tmp_path: Path
) -> None:
    assert deploy(srv, tmp_path / "a", "lz-a", 1).status_code == 201
    assert deploy(srv, tmp_path / "b", "lz-b", 1).status_code == 201
    assert deploy(srv, tmp_path / "c", "lz-a", 1, namespace="lz-other").status_code == 201
    a, b, c = call(srv, "lz-a"), call(srv, "lz-b"), call(srv, "lz-a", "lz-other")
    assert len({a["token"], b["token"], c["token"]}) == 3
    for out in (a, b, c):  # each its own /tmp: one import each
        assert out["imports"] == [out["token"]]
    mine = {(z["namespace"], z["function"]) for z in zygotes(srv)}
    assert {("default", "lz-a"), ("default", "lz-b"), ("lz-other", "lz-a")} <= mine


def test_new_secrets_give_a_new_layer_zygote(srv: EmberServer, tmp_path: Path) -> None:
    r = srv.api.put("/api/v1/secrets/token", content=b"one")
    assert r.status_code == 201, r.text
    yaml = "functions:\n  lz-secret:\n    secrets: [token]\n"
    assert deploy(srv, tmp_path, "lz-secret", 1, **{"ember.yaml": yaml}).status_code == 201
    first = call(srv, "lz-secret")
    assert first["secret"] == "one"
    assert srv.api.put("/api/v1/secrets/token", content=b"two").status_code == 200
    second = call(srv, "lz-secret")
    assert second["secret"] == "two"  # not the first layer zygote's /run/secrets
    assert second["token"] != first["token"]


def test_without_layer_zygotes_each_revision_imports_its_packages(
    house: Path, tmp_path: Path, server_factory: Callable[..., EmberServer]
) -> None:
    srv = server_factory("--find-links", str(house), "--no-index", "--layer-zygotes", "0")
    assert deploy(srv, tmp_path, "lz-off", 1).status_code == 201
    first = call(srv, "lz-off")
    assert deploy(srv, tmp_path, "lz-off", 2).status_code == 201
    second = call(srv, "lz-off")
    assert second["token"] != first["token"]
    assert second["cwd"] == "/code"
    assert zygotes(srv) == []


def until(check: Callable[[], bool]) -> None:
    """Wait for something the server does on its own (its keep-alive step), at most 30 s."""
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, "the server did not get there in 30 s"
        time.sleep(0.1)


def test_the_least_recently_used_idle_layer_zygote_makes_room(
    house: Path, tmp_path: Path, server_factory: Callable[..., EmberServer]
) -> None:
    srv = server_factory(
        "--find-links", str(house), "--no-index", "--layer-zygotes", "1", "--zygote-keepalive", "1"
    )
    quick = "functions:\n  lz-first:\n    scale: {idle: 1s}\n"
    assert deploy(srv, tmp_path / "a", "lz-first", 1, **{"ember.yaml": quick}).status_code == 201
    first = call(srv, "lz-first")
    # its instance and function zygote go after a second of idleness; its layer zygote stays
    until(lambda: [(z["function"], z["running"]) for z in zygotes(srv)] == [("lz-first", 0)])
    assert deploy(srv, tmp_path / "b", "lz-second", 1).status_code == 201
    assert [z["function"] for z in zygotes(srv)] == ["lz-second"]  # the idle one made room
    assert call(srv, "lz-second")["token"] != first["token"]


def test_a_removed_functions_layer_zygote_goes(srv: EmberServer, tmp_path: Path) -> None:
    assert deploy(srv, tmp_path, "lz-gone", 1).status_code == 201
    call(srv, "lz-gone")
    assert "lz-gone" in [z["function"] for z in zygotes(srv)]
    assert srv.api.delete("/api/v1/functions/lz-gone").status_code == 200
    until(lambda: "lz-gone" not in [z["function"] for z in zygotes(srv)])


def test_an_at_fork_hook_of_a_preloaded_package_runs_in_each_instance(
    srv: EmberServer, tmp_path: Path
) -> None:
    """A package the layer zygote imported registered it: the instances (forks of a function
    zygote that did not register it) still run it, as `os.fork()` does."""
    code = (
        "import os\nimport emberdep_hooked\n\n"
        "def handle(req, ctx):\n    return {'pid': os.getpid(), 'ran': emberdep_hooked.CHILDREN}\n"
    )
    directory = make_function(
        tmp_path, "lz-hooked", code, files={"requirements.txt": b"emberdep-hooked\n"}
    )
    r = post(srv, directory, "lz-hooked")
    assert r.status_code == 201, r.text
    assert "lz-hooked" in [z["function"] for z in zygotes(srv)]
    out = call(srv, "lz-hooked")
    assert out["ran"][-1] == out["pid"]  # the hook ran in this instance


ORPHANING = """
import os, time
import emberdep_counted

def handle(req, ctx):
    if req.query.get("check"):
        pid = int(open("/tmp/orphan.pid").read())
        return {"orphan_alive": os.path.exists(f"/proc/{pid}")}
    if os.fork() == 0:  # a daemon: the middle process exits, the grandchild lives on
        if os.fork() == 0:
            with open("/tmp/orphan.pid", "w") as f:
                f.write(str(os.getpid()))
            time.sleep(3600)
        os._exit(0)
    while not os.path.exists("/tmp/orphan.pid"):
        time.sleep(0.01)
    return {"started": True}
"""


def test_what_a_revisions_instances_leave_behind_ends_with_it(
    srv: EmberServer, tmp_path: Path
) -> None:
    """Its zygote is not pid 1 of a namespace of its own (the layer zygote is): it adopts
    and ends what its instances left running, as the kernel did for it before."""

    def deploy_orphaning(version: int) -> None:
        code = ORPHANING + f"\nVERSION = {version}\n"
        directory = make_function(
            tmp_path, "lz-orphans", code, files={"requirements.txt": b"emberdep-counted\n"}
        )
        r = post(srv, directory, "lz-orphans")
        assert r.status_code == 201, r.text

    deploy_orphaning(1)
    assert call(srv, "lz-orphans") == {"started": True}
    deploy_orphaning(2)  # revision 1 drains and its zygote goes; its daemon sleeps an hour

    def gone() -> bool:
        return srv.http.get("/fn/lz-orphans", params={"check": "1"}).json() == {
            "orphan_alive": False
        }

    until(gone)


def test_a_module_of_the_function_is_never_hidden_by_a_preloaded_one(
    srv: EmberServer, tmp_path: Path
) -> None:
    code = "import emberdep_counted\n\ndef handle(req, ctx):\n    return emberdep_counted.TOKEN\n"
    directory = make_function(
        tmp_path,
        "lz-own",
        code,
        files={
            "requirements.txt": b"emberdep-counted\n",
            "emberdep_counted.py": b"TOKEN = 'its own'\n",  # as without a layer zygote
        },
    )
    r = post(srv, directory, "lz-own")
    assert r.status_code == 201, r.text
    assert srv.http.get("/fn/lz-own").text == "its own"
    # the start that passed it by holds it no longer: it goes with its function
    assert srv.api.delete("/api/v1/functions/lz-own").status_code == 200
    until(lambda: "lz-own" not in [z["function"] for z in zygotes(srv)])
