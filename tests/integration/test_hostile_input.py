"""Hostile input against a real server (issue 3, item 9): each is a clear 4xx, and nothing is
stored: no function, no revision, no blob, no code directory."""

from __future__ import annotations

import contextlib
import gzip
import io
import socket
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import EmberServer, wait_for

HANDLER = b"def handle(req, ctx):\n    return 'ok'\n"


def _tar(*members: tarfile.TarInfo | tuple[str, bytes], level: int = 6) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for member in members:
            if isinstance(member, tuple):
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
            else:
                tar.addfile(member)
    return gzip.compress(raw.getvalue(), compresslevel=level)


def _link(name: str, kind: bytes, target: str = "", **fields: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _bomb() -> bytes:
    """A gzip stream of a few hundred KB that expands to 1 GB of zeros in one member."""
    header = tarfile.TarInfo("zeros.bin")
    header.size = 1 << 30
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as gz:
        gz.write(header.tobuf())
        chunk = bytes(1 << 20)
        for _ in range(1 << 10):
            gz.write(chunk)
    return out.getvalue()


def _many(count: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.addfile(_sized("handler.py", HANDLER), io.BytesIO(HANDLER))
        empty = tarfile.TarInfo("f")
        for i in range(count):
            empty.name = f"d{i % 100}/f{i}"
            tar.addfile(empty)
    return gzip.compress(raw.getvalue(), compresslevel=1)


def _sized(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


BUNDLES: dict[str, tuple[Callable[[], bytes], str]] = {
    "path traversal": (lambda: _tar(("handler.py", HANDLER), ("../../evil.py", b"x")), "'..'"),
    "absolute path": (lambda: _tar(("handler.py", HANDLER), ("/etc/evil", b"x")), "absolute"),
    "symlink out": (
        lambda: _tar(("handler.py", HANDLER), _link("l", tarfile.SYMTYPE, "/etc/passwd")),
        "symbolic link",
    ),
    "hard link": (
        lambda: _tar(("handler.py", HANDLER), _link("h", tarfile.LNKTYPE, "/etc/shadow")),
        "hard link",
    ),
    "device file": (
        lambda: _tar(("handler.py", HANDLER), _link("mem", tarfile.CHRTYPE, devmajor=1)),
        "device",
    ),
    "tar bomb": (_bomb, "MiB"),
    "100k tiny files": (lambda: _many(100_000), "files"),
    "not gzip": (lambda: b"PK\x03\x04 this is a zip", "gzip"),
    "gzip of garbage": (lambda: gzip.compress(b"\x00garbage" * 100), "tar"),
}


def _stored(server: EmberServer) -> tuple[object, ...]:
    listed = server.api.get("/api/v1/functions").json()["functions"]
    blobs = sorted(p.name for p in (server.home / "blobs").rglob("*") if p.is_file())
    code = sorted(p.name for p in (server.home / "code").iterdir())
    return (
        tuple((f["namespace"], f["name"], f["revision"]) for f in listed),
        tuple(blobs),
        tuple(code),
    )


def _nothing_stored(server: EmberServer, before: tuple[object, ...]) -> None:
    """What a refused deploy unpacked is renamed aside and deleted in the background: wait for
    it to go, then nothing may differ."""
    wait_for(lambda: _stored(server) == before, 10, "the refused deploy to leave nothing")


@pytest.mark.parametrize(("make", "words"), BUNDLES.values(), ids=BUNDLES.keys())
def test_hostile_bundles_are_refused_and_nothing_is_stored(
    server: EmberServer, make: Callable[[], bytes], words: str
):
    before = _stored(server)
    resp = server.api.post("/api/v1/deploy", params={"name": "hostile"}, content=make())
    assert 400 <= resp.status_code < 500, resp.text
    assert words in resp.json()["error"]["message"], resp.json()
    _nothing_stored(server, before)


NAMES = {
    "slash": "a/b",
    "dot dot": "..",
    "dot": ".",
    "leading dot": ".hidden",
    "uppercase": "Hello",
    "unicode lookalike": "h\u0435llo",  # Cyrillic ie for the e
    "right-to-left override": "abc\u202egnp",
    "null byte": "a\x00b",
    "too long": "a" * 64,
    "space": "a b",
}


@pytest.mark.parametrize("name", NAMES.values(), ids=NAMES.keys())
def test_hostile_names_are_refused(server: EmberServer, name: str):
    before = _stored(server)
    resp = server.api.post(
        "/api/v1/deploy", params={"name": name}, content=_tar(("handler.py", HANDLER))
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_name", resp.text
    ns = server.api.post(
        "/api/v1/deploy",
        params={"name": "fine", "namespace": name},
        content=_tar(("handler.py", HANDLER)),
    )
    assert ns.status_code == 400 and ns.json()["error"]["code"] == "bad_name", ns.text
    _nothing_stored(server, before)


MALFORMED = {
    "yaml syntax": (b"functions: {a: [", "not valid YAML"),
    "yaml tabs": (b"functions:\n\ta: {}\n", "not valid YAML"),
    "yaml not a mapping": (b"- a\n- b\n", "mapping"),
    "unknown key": (b"functions:\n  a:\n    memroy: 128\n", "unknown key"),
    "bad secret name": (b"functions:\n  a:\n    secrets: ['../x']\n", "invalid"),
    "bad access": (b"functions:\n  a:\n    access: world\n", "access policy"),
}


@pytest.mark.parametrize(("yaml", "words"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_manifests_are_refused(server: EmberServer, yaml: bytes, words: str):
    before = _stored(server)
    bundle = _tar(("handler.py", HANDLER), ("ember.yaml", yaml))
    resp = server.api.post("/api/v1/deploy", params={"name": "a"}, content=bundle)
    assert resp.status_code == 400 and words in resp.json()["error"]["message"], resp.text
    _nothing_stored(server, before)


@pytest.mark.parametrize(
    "body", [b"{", b"[]", b'{"instances": "many"}', b'{"instances": 1, "x": 2}', b"\xff\xfe"]
)
def test_malformed_json_bodies_are_400(server: EmberServer, fn_dir: Callable[..., Path], body):
    server.deploy(fn_dir("jsonfn", HANDLER.decode()))
    for path in ("/api/v1/functions/jsonfn/scale", "/api/v1/keys"):
        resp = server.api.post(path, content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, (path, resp.text)
    quota = server.api.put("/api/v1/namespaces/default/quota", content=body)
    assert quota.status_code == 400, quota.text


def _send_and_read(port: int, request: bytes) -> bytes:
    """Everything the server answers to `request`. The server may answer and close before it
    has read all of it: the rest is sent from a thread, so the answer is read meanwhile."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # refused before the end: the point of the test
                sock.sendall(request)

        sender = threading.Thread(target=send)
        sender.start()
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:  # the unread rest of the request resets the connection
            pass
        with contextlib.suppress(OSError):  # ends a send still blocked on a full buffer
            sock.shutdown(socket.SHUT_RDWR)
        sender.join()
    return answer


def test_oversized_headers_are_refused_and_the_server_keeps_serving(
    server: EmberServer, fn_dir: Callable[..., Path]
):
    server.deploy(fn_dir("headers", HANDLER.decode()))
    for size in (70 * 1024, 8 * 1024 * 1024):
        request = b"GET /fn/headers HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
        answer = _send_and_read(server.port, request)
        assert answer.startswith(b"HTTP/1.1 431 "), (size, answer[:200])
        assert b"headers_too_large" in answer
    assert server.http.get("/fn/headers", headers={"X-Fine": "a" * 8000}).text == "ok"
    assert server.http.get("/fn/headers").text == "ok"
