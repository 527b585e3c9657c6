"""The `ember` command against a real server, as a user types it."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

from tests.integration.conftest import EmberServer, wait_for

CHATTY = """
import logging, sys

def handle(req, ctx):
    print("to stdout", req.query.get("tag"))
    sys.stderr.write("to stderr\\n")
    ctx.log.warning("via ctx.log")
    logging.getLogger("lib").info("via logging")
    if req.body:
        return req.body
    return {"tag": req.query.get("tag")}
"""


def test_deploy_invoke_ls_describe_rm(server: EmberServer, fn_dir: Callable[..., Path]):
    out = server.deploy(fn_dir("chatty", CHATTY)).stdout.decode()
    assert "chatty" in out and "revision 1" in out
    plain = server.cli("invoke", "chatty")
    assert json.loads(plain.stdout) == {"tag": None}
    binary = bytes(range(256))
    data = fn_dir("payload", "x = 1\n") / "cat.png"
    data.write_bytes(binary)
    echoed = server.cli("invoke", "chatty", "--data", f"@{data}")
    assert echoed.stdout == binary
    machine = json.loads(server.cli("invoke", "chatty", "--json").stdout)
    assert machine["status"] == 200 and machine["start"] == "warm" and machine["revision"]
    listing = server.cli("ls").stdout.decode()
    assert "chatty" in listing
    described = json.loads(server.cli("describe", "chatty", "--json").stdout)
    assert described["name"] == "chatty" and described["revisions"][0]["number"] == 1
    assert server.cli("describe", "chatty").returncode == 0
    server.cli("rm", "chatty")
    gone = server.cli("invoke", "chatty", check=False)
    assert gone.returncode == 2 and b"no function named 'chatty'" in gone.stderr


def test_logs_and_activations(server: EmberServer, fn_dir: Callable[..., Path]):
    server.deploy(fn_dir("talk", CHATTY))
    resp = server.http.get("/fn/talk", params={"tag": "t1"})
    rid = resp.headers["x-ember-request-id"]

    def logged() -> bool:
        out = server.cli("logs", "talk", "--json").stdout.decode().splitlines()
        mine = [json.loads(line) for line in out if rid in line]
        return {r["stream"] for r in mine} >= {"stdout", "stderr", "log"}

    wait_for(logged, 10, "the invocation's logs")
    human = server.cli("logs", "talk", "--since", "5m").stdout.decode()
    assert "to stdout t1" in human and "via ctx.log" in human and "via logging" in human
    assert rid[:8] in human
    acts = json.loads(server.cli("activations", "talk", "--json").stdout)["activations"]
    act = next(a for a in acts if a["id"] == rid)
    assert act["status"] == 200 and act["tier"] in ("fork", "warm") and act["billed_ms"] >= 1
    assert act["function"] == "default/talk" and act["revision"] == 1 and act["instance"]
    assert act["peak_memory_kb"] > 0
    assert rid[:8] in server.cli("activations", "talk").stdout.decode()


def test_logs_follow_streams_new_lines(server: EmberServer, fn_dir: Callable[..., Path]):
    import subprocess

    from tests.integration.conftest import ember_cmd

    server.deploy(fn_dir("follow", CHATTY))
    with subprocess.Popen(
        [*ember_cmd(), "logs", "follow", "-f", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=server.env(),
    ) as proc:
        try:
            server.http.get("/fn/follow", params={"tag": "streamed"})
            assert proc.stdout is not None
            seen = []
            for raw in proc.stdout:
                seen.append(json.loads(raw))
                if "streamed" in seen[-1]["message"]:
                    break
            assert any("streamed" in r["message"] for r in seen)
        finally:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the CLI stops following and exits 0
            _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()


def test_doctor_reports_the_hosts_protections(server: EmberServer):
    out = server.cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["memory limit"]["ok"]
    assert "die with parent" in checks
    assert server.cli("doctor").returncode == 0


def test_cli_errors_are_clear(server: EmberServer, tmp_path: Path):
    missing = server.cli("deploy", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode == 2 and b"Traceback" not in missing.stderr
    unknown = server.cli("scale", "ghost", "--instances", "0", check=False)
    assert unknown.returncode == 2 and b"ghost" in unknown.stderr
    env = {**server.env(), "EMBER_URL": "http://127.0.0.1:1"}
    import subprocess

    from tests.integration.conftest import ember_cmd

    down = subprocess.run([*ember_cmd(), "ls"], capture_output=True, env=env, timeout=30)
    assert down.returncode == 5 and b"no Ember server" in down.stderr


def _png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    raw = b"".join(
        b"\x00" + b"".join(bytes((x % 256, y % 256, 7)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_examples_in_the_readme_deploy_and_answer(server: EmberServer, tmp_path: Path):
    import struct

    examples = Path(__file__).resolve().parents[2] / "examples"
    for name in ("hello", "echo", "thumbnail", "fetch"):  # the last two: from PyPI
        server.deploy(examples / name)
    assert server.http.get("/fn/hello", params={"name": "ada"}).json() == {"hello": "ada"}
    assert server.http.post("/fn/echo/x", content=b"abc").json()["bytes"] == 3
    cat = tmp_path / "cat.png"
    cat.write_bytes(_png(300, 200))
    thumb = server.cli("invoke", "thumbnail", "--data", f"@{cat}").stdout
    assert thumb.startswith(b"\x89PNG")
    assert struct.unpack(">II", thumb[16:24]) == (128, 85)
    bad = server.http.post("/fn/thumbnail", content=b"not a png")
    assert bad.status_code == 400 and "not an image" in bad.json()["error"]
    fetched = server.http.get("/fn/fetch", params={"url": f"{server.url}/healthz"}).json()
    assert fetched["status"] == 200 and fetched["from"].startswith("/layer/httpx/")
