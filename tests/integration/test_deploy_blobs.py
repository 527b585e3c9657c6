"""A deploy stores its bundle's blob while the new zygotes import (not after), so one that
stores no revision must take the blob away again: nothing a refused or unchanged deploy sent
stays on disk."""

from __future__ import annotations

import io
import tarfile

from tests.integration.conftest import EmberServer, wait_for

GOOD = b"def handle(req, ctx):\n    return 'kept'\n"
BROKEN = b"raise RuntimeError('no init for you')\n"


def _bundle(code: bytes, mtime: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("handler.py")
        info.size, info.mtime = len(code), mtime
        tar.addfile(info, io.BytesIO(code))
    return buf.getvalue()


def _on_disk(server: EmberServer) -> tuple[list[str], list[str]]:
    blobs = sorted(p.name for p in (server.home / "blobs").rglob("*") if p.is_file())
    code = sorted(p.name for p in (server.home / "code").iterdir())
    return blobs, code


def _settles_at(server: EmberServer, expected: tuple[list[str], list[str]]) -> None:
    """Code directories set aside are deleted in the background: wait for them to go."""
    wait_for(lambda: _on_disk(server) == expected, 10, "the deploy's leftovers to go")


def test_a_deploy_whose_import_fails_leaves_no_blob(server: EmberServer) -> None:
    kept = server.api.post("/api/v1/deploy", params={"name": "blob-a"}, content=_bundle(GOOD))
    assert kept.status_code == 201, kept.text
    before = _on_disk(server)
    refused = server.api.post("/api/v1/deploy", params={"name": "blob-b"}, content=_bundle(BROKEN))
    assert refused.status_code == 422 and "no init for you" in refused.text, refused.text
    _settles_at(server, before)


def test_the_same_code_in_another_bundle_leaves_no_second_blob(server: EmberServer) -> None:
    first = server.api.post("/api/v1/deploy", params={"name": "blob-c"}, content=_bundle(GOOD, 1))
    assert first.status_code == 201, first.text
    before = _on_disk(server)
    again = server.api.post("/api/v1/deploy", params={"name": "blob-c"}, content=_bundle(GOOD, 2))
    assert again.status_code == 200 and again.json()["functions"][0]["created"] is False
    _settles_at(server, before)
