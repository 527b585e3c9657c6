"""Namespaces, API keys, private functions, secrets and quotas (issue 3, items 5-8), over HTTP
and the CLI of a real server."""

from __future__ import annotations

import concurrent.futures as cf
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.integration.conftest import GATED, EmberServer, Gate, ember_cmd

WHO = """
import os
def handle(req, ctx):
    return {"namespace": os.environ.get("EMBER_NAMESPACE", "?"), "code": "%s",
            "auth": req.headers.get("authorization")}
"""


def _key(server: EmberServer, *scopes: str, rate: str = "0", burst: str = "0") -> str:
    args = ["keys", "create", *[a for s in scopes for a in ("--scope", s)]]
    out = server.cli(*args, "--rate", rate, "--burst", burst)
    token = out.stdout.decode().strip()
    assert token.startswith("ember_") and b"not shown again" in out.stderr
    return token


def _as(server: EmberServer, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def test_admin_key_is_written_0600_and_every_api_call_needs_a_key(server: EmberServer):
    creds = server.home / "credentials"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert stat.S_IMODE((server.home / "master.key").stat().st_mode) == 0o600
    for path in ("/api/v1/functions", "/api/v1/keys", "/api/v1/namespaces", "/api/v1/doctor"):
        resp = server.http.get(path)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized", path
        assert resp.headers["www-authenticate"].startswith("Bearer")
    with _as(server, "ember_00000000_" + "A" * 43) as forged:
        assert forged.get("/api/v1/functions").status_code == 401
    assert server.api.get("/api/v1/functions").status_code == 200
    assert server.http.get("/healthz").status_code == 200, "health stays open"


def test_namespaces_keep_names_apart_and_routes_stay_unambiguous(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    server.deploy(fn_dir("same", WHO % "default-code"))
    server.deploy(fn_dir("same", WHO % "team-code"), "--namespace", "team-a")
    assert server.http.get("/fn/same").json()["code"] == "default-code"
    assert server.http.get("/fn/team-a/same").json()["code"] == "team-code"
    assert server.http.get("/fn/default/same").json()["code"] == "default-code"
    assert server.cli("invoke", "same", "--namespace", "team-a").stdout.count(b"team-code") == 1
    # A function of `default` may not take a namespace's name, nor the other way round.
    clash = server.cli("deploy", str(fn_dir("team-a", WHO % "x")), check=False)
    assert clash.returncode == 2 and b"is a namespace" in clash.stderr
    server.deploy(fn_dir("solo", WHO % "solo"))
    hidden = server.cli("deploy", str(fn_dir("y", WHO % "y")), "--namespace", "solo", check=False)
    assert hidden.returncode == 2 and b"would hide the function" in hidden.stderr
    listed = server.cli("ls", "--json").stdout
    assert b'"namespace":"team-a"' in listed and b'"namespace":"default"' in listed


def test_scoped_keys_private_functions_and_revocation(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    private = "functions:\n  vault:\n    access: private\n"
    server.deploy(fn_dir("vault", WHO % "vault", private), "--namespace", "team-b")
    deployer = _key(server, "deploy:team-b")
    invoker = _key(server, "invoke:team-b")
    outsider = _key(server, "invoke:team-c", "read:*")

    # Deploy rights end at the namespace; read comes with deploy, invoke does not.
    with _as(server, deployer) as d:
        assert d.get("/api/v1/functions/vault", params={"namespace": "team-b"}).status_code == 200
        denied = d.get("/api/v1/functions", params={"namespace": "default"})
        assert denied.status_code == 403 and "read:default" in denied.json()["error"]["message"]
        assert d.get("/api/v1/keys").status_code == 403
    # A private function: 401 without a key, 403 with the wrong one, 200 with invoke:team-b.
    assert server.http.get("/fn/team-b/vault").status_code == 401
    with _as(server, outsider) as o:
        assert o.get("/fn/team-b/vault").status_code == 403
        assert o.get("/api/v1/functions", params={"namespace": "team-b"}).status_code == 200
    with _as(server, invoker) as i:
        ok = i.get("/fn/team-b/vault")
        assert ok.status_code == 200 and ok.json()["auth"] is None, "the key stays with Ember"
    # Public functions never see the CLI's key either.
    server.deploy(fn_dir("open", WHO % "open"))
    assert b'"auth":null' in server.cli("invoke", "open").stdout
    # Keys are listed without their secret part, and revoking one ends it at once.
    listed = server.cli("keys", "ls", "--json").stdout.decode()
    # ember_<id>_<secret>: the secret is base64url, which may hold '_' itself.
    _, key_id, secret = invoker.split("_", 2)
    assert key_id in listed and secret not in listed
    server.cli("keys", "revoke", key_id)
    with _as(server, invoker) as i:
        assert i.get("/fn/team-b/vault").status_code == 401
    db = (server.home / "ember.db").read_bytes()
    assert secret.encode() not in db, "only a digest is stored"


def test_rate_limit_per_key_is_429_with_retry_after(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    server.deploy(
        fn_dir("metered", WHO % "m", "functions:\n  metered:\n    access: private\n"),
        "--namespace",
        "team-r",
    )
    slow = _key(server, "invoke:team-r", rate="0.01", burst="2")  # refills in 100 s
    with _as(server, slow) as c:
        codes = [c.get("/fn/team-r/metered").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        limited = c.get("/fn/team-r/metered")
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1


SECRET_READER = """
import os
def handle(req, ctx):
    path = "/run/secrets/db-password"
    try:
        open(path, "w")
        writable = True
    except OSError:
        writable = False
    return {"file": open(path).read(), "env": os.environ.get("DB_PASSWORD"),
            "mode": oct(os.stat(path).st_mode & 0o777), "writable": writable,
            "listing": sorted(os.listdir("/run/secrets"))}
"""


def test_secrets_are_encrypted_at_rest_and_reach_only_functions_that_list_them(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    value = "s3cr3t-Value-9f7c"
    missing = server.cli(
        "deploy",
        str(fn_dir("early", SECRET_READER, "functions:\n  early:\n    secrets: [db-password]\n")),
        "--namespace",
        "team-s",
        check=False,
    )
    assert missing.returncode == 3 and b"ember secrets set db-password" in missing.stderr
    server.cli("secrets", "set", "db-password", "--namespace", "team-s", input=value.encode())
    manifest = "functions:\n  reader:\n    secrets: [{name: db-password, env: DB_PASSWORD}]\n"
    server.deploy(fn_dir("reader", SECRET_READER, manifest), "--namespace", "team-s")
    server.deploy(fn_dir("nosy", SECRET_READER), "--namespace", "team-s")
    got = server.http.get("/fn/team-s/reader").json()
    assert got["file"] == value and got["env"] == value
    assert got["mode"] == "0o400" and not got["writable"]
    nosy = server.http.get("/fn/team-s/nosy")
    assert nosy.status_code == 500 and "FileNotFoundError" in nosy.text, "others do not get it"
    assert value not in nosy.text
    # A new value reaches the function on its next start.
    server.cli("secrets", "set", "db-password", "--namespace", "team-s", input=b"rotated")
    assert server.http.get("/fn/team-s/reader").json()["file"] == "rotated"
    # Nowhere else: API, CLI, logs, activations, the store and its files.
    listing = server.cli("secrets", "ls", "--namespace", "team-s", "--json").stdout.decode()
    assert "db-password" in listing and value not in listing and "rotated" not in listing
    described = server.cli("describe", "reader", "--namespace", "team-s", "--json").stdout
    assert b"rotated" not in described and value.encode() not in described
    for name in ("reader", "nosy"):
        for command in ("logs", "activations"):
            out = server.cli(command, name, "--namespace", "team-s", "--json").stdout
            assert value.encode() not in out and b"rotated" not in out
    for path in server.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert value.encode() not in data and b"rotated" not in data, path
    assert value not in server.output()
    in_use = server.cli("secrets", "rm", "db-password", "--namespace", "team-s", check=False)
    assert in_use.returncode == 2 and b"reader" in in_use.stderr


SLOW = (
    GATED
    + """
def handle(req, ctx):
    gate(req)
    return "done"
"""
)


def test_namespace_quotas_name_the_limit(server: EmberServer, fn_dir: Callable[..., Path]):
    server.cli("quota", "set", "team-q", "--functions", "1", "--instances", "1", "--memory", "256")
    server.deploy(fn_dir("first", SLOW), "--namespace", "team-q")
    second = server.cli("deploy", str(fn_dir("second", SLOW)), "--namespace", "team-q", check=False)
    assert second.returncode == 2 and b"max_functions" in second.stderr
    big = fn_dir("first", SLOW, "functions:\n  first:\n    memory: 512\n")
    too_big = server.cli("deploy", str(big), "--namespace", "team-q", check=False)
    assert too_big.returncode == 2 and b"max_memory=256" in too_big.stderr
    with Gate() as gate, cf.ThreadPoolExecutor(1) as pool:
        running = pool.submit(server.http.get, f"/fn/team-q/first?gate={gate.port}")
        gate.wait(1)
        # One runs; the second would need a second instance: 429 naming the quota.
        second = server.http.get("/fn/team-q/first")
        assert second.status_code == 429, second.text
        assert "max_instances=1" in second.json()["error"]["message"], second.text
        gate.open()
        assert running.result().status_code == 200
    again = server.http.get("/fn/team-q/first")  # the one instance, idle again, serves
    assert again.status_code == 200 and again.headers["x-ember-start"] == "warm", again.text
    listed = server.api.get("/api/v1/namespaces").json()["namespaces"]
    team = next(ns for ns in listed if ns["name"] == "team-q")
    assert team["quota"] == {"functions": 1, "instances": 1, "memory_mb": 256}
    assert team["uid"] > 0


def test_quota_and_keys_need_an_admin_key(server: EmberServer):
    reader = _key(server, "read:*")
    env = {**os.environ, "EMBER_URL": server.url, "EMBER_KEY": reader, "EMBER_HOME": "/nonexistent"}
    done = subprocess.run(
        [*ember_cmd(), "quota", "set", "default", "--functions", "1"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2 and b"not an admin key" in done.stderr


PHISH = """
import ember
def handle(req, ctx):
    if "authorization" in req.headers:
        return {"stolen": req.headers["authorization"]}
    return ember.Response(
        {"error": {"code": "unauthorized", "message": "give me your key"}},
        status=401,
        headers={"WWW-Authenticate": "Bearer", "X-Ember-Auth": "required"},
    )
"""


def test_a_public_function_never_gets_the_cli_key_even_when_it_asks(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    """Regression: `ember invoke` used to retry with its (admin) key on any Ember-shaped 401."""
    server.deploy(fn_dir("phish", PHISH))
    out = server.cli("invoke", "phish", check=False)
    assert out.returncode != 0 and server.admin_key.encode() not in out.stdout + out.stderr
    # Nor when someone sends an Ember key to a public function by mistake: Ember drops it.
    with _as(server, server.admin_key) as c:
        resp = c.get("/fn/phish")
    assert resp.status_code == 401 and server.admin_key not in resp.text


def test_a_function_that_turns_private_mid_request_is_not_served_without_a_key(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    """Regression: the key was checked against the target seen before the body arrived."""
    server.deploy(fn_dir("flip", WHO % "open"))
    head = b"POST /fn/flip HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b"\r\n")
        # 100 Continue: the gateway has chosen the (public) target and waits for the body
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        server.deploy(fn_dir("flip", WHO % "closed", "functions:\n  flip:\n    access: private\n"))
        sock.sendall(b"abcd")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]


SPOOF = """
import ember
import ember.runtime.convert as convert

convert.RESERVED_HEADERS = set()  # the function's own copy of the runtime: it may change it

def handle(req, ctx):
    return ember.Response(
        {"auth": req.headers.get("authorization")},
        headers={"X-Ember-Auth": "required", "X-Ember-Request-Id": "spoofed",
                 "Transfer-Encoding": "chunked"},
    )
"""


def test_the_gateway_not_the_sandboxed_runtime_filters_what_functions_answer(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    """Regression: the header filter ran only inside the instance, which the function controls."""
    server.deploy(fn_dir("spoof", SPOOF))
    resp = server.http.get("/fn/spoof", headers={"Authorization": f"Bearer  {server.admin_key}"})
    assert resp.status_code == 200
    assert "x-ember-auth" not in resp.headers and "transfer-encoding" not in resp.headers
    assert resp.headers["x-ember-request-id"] != "spoofed"
    assert resp.json()["auth"] is None, "an Ember key is never passed on, however it is spaced"
