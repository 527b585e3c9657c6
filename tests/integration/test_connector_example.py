"""The example connector (examples/connector-tcp) in a real server, found the way an installed
connector is: through its `ember.triggers` entry point. Instead of `pip install`, the test
puts the module and a hand-made `.dist-info` (what pip would write) in a directory on the
server's PYTHONPATH, which `importlib.metadata` searches like site-packages."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import EmberServer, _free_port, wait_for
from tests.integration.test_triggers import Recorder, deploy, triggers

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "connector-tcp"
METADATA = "Metadata-Version: 2.1\nName: ember-connector-tcp\nVersion: 0.1.0\n"
ENTRY_POINTS = "[ember.triggers]\ntcp = ember_tcp_source:TcpLines\n"


class WithConnector(EmberServer):
    """A server whose Python also searches `site` (where the connector is "installed")."""

    def __init__(self, home: Path, site: Path) -> None:
        super().__init__(home, [])
        self.site = site

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.site), env.get("PYTHONPATH")]))
        return env


def installed(site: Path) -> Path:
    """What `pip install examples/connector-tcp` puts in site-packages, by hand."""
    site.mkdir()
    shutil.copy(EXAMPLE / "ember_tcp_source.py", site)
    info = site / "ember_connector_tcp-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(METADATA)
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.http.shutdown()
    rec.http.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmberServer]:
    root = tmp_path_factory.mktemp("connector")
    srv = WithConnector(root / "home", installed(root / "site")).start()
    yield srv
    code = srv.stop()
    srv.http.close()
    srv.api.close()
    assert code == 0, srv.output()


def send(port: int, lines: bytes, answers: int) -> tuple[str, list[str]]:
    """Write `lines`, close our side (as `nc -N`), read `answers` lines and the close: the
    sender's address and the answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(lines)
        sock.shutdown(socket.SHUT_WR)
        with sock.makefile("rb") as received:
            got = received.read().decode().splitlines()  # up to the source's close
        host, local = sock.getsockname()[:2]
    assert len(got) == answers, got
    return f"{host}:{local}", got


def test_a_connector_installed_beside_ember_is_a_trigger_type(
    server: EmberServer, recorder: Recorder, tmp_path: Path
) -> None:
    port = _free_port()
    manifest = (
        f"triggers: [{{type: tcp, name: lines, listen: '127.0.0.1:{port}'}}]\nenv: {{V: '1'}}"
    )
    done = deploy(server, tmp_path, "tcpfn", recorder.url, manifest)
    assert done.returncode == 0, done.stderr.decode() + server.output()
    wait_for(lambda: triggers(server, "tcpfn")["lines"]["state"] == "running", 10, "listening")
    peer, answers = send(port, b'hello\nid=order-7 {"n": 7}\n', 2)
    assert sorted(answers) == sorted([f"ok {peer}-1", "ok order-7"])  # as each was acked
    seen = {s["headers"]["ce-id"]: s for s in recorder.wait(peer, 2)}
    assert set(seen) == {f"{peer}-1", "order-7"}
    hello = seen[f"{peer}-1"]
    assert hello["body"] == "hello" and seen["order-7"]["body"] == '{"n": 7}'
    assert hello["headers"]["ce-type"] == "io.ember.tcp.line"
    assert hello["headers"]["ce-source"] == f"tcp://127.0.0.1:{port}"
    assert hello["headers"]["content-type"] == "text/plain"
    view = triggers(server, "tcpfn")["lines"]
    shown = {key: view[key] for key in ("type", "state", "delivered", "failed")}
    assert shown == {"type": "tcp", "state": "running", "delivered": 2, "failed": 0}

    # Deployed again, the trigger keeps running (check() passes on its own port), same id
    again = deploy(server, tmp_path / "2", "tcpfn", recorder.url, manifest.replace("'1'", "'2'"))
    assert again.returncode == 0, again.stderr.decode()
    assert triggers(server, "tcpfn")["lines"]["id"] == view["id"]
    peer, answers = send(port, b"more\n", 1)
    assert answers == [f"ok {peer}-1"] and recorder.wait(peer, 1)[0]["body"] == "more"
    wait_for(lambda: triggers(server, "tcpfn")["lines"]["delivered"] == 3, 10, "3 delivered")


def test_a_taken_address_is_refused_at_deploy_naming_listen(
    server: EmberServer, recorder: Recorder, tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        manifest = f"triggers: [{{type: tcp, listen: '{listen}'}}]"
        done = deploy(server, tmp_path, "busy", recorder.url, manifest)
    out = done.stderr.decode() + done.stdout.decode()
    assert done.returncode != 0 and "trigger 'tcp' (tcp) listen: cannot listen on" in out, out
    public = deploy(
        server,
        tmp_path / "2",
        "open",
        recorder.url,
        "triggers: [{type: tcp, listen: '0.0.0.0:7001'}]",
    )
    out = public.stderr.decode() + public.stdout.decode()
    assert public.returncode != 0 and "public: true" in out, out
