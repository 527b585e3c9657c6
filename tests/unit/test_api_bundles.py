"""Bundles on disk: code directories are removed off the event loop, and a removal never races a
deploy that brings the same content-addressed directory back."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from ember import bundle
from ember.api.bundles import Bundles
from ember.blobs.local import LocalBlobs
from ember.layers.builder import Layers
from ember.layers.uv import PackageIndex
from ember.spec import FunctionSpec
from ember.store.sqlite import SQLiteStore


def _bundle(tmp_path: Path, text: str) -> bytes:
    src = tmp_path / f"src-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    src.mkdir()
    (src / "handler.py").write_text(text)
    return bundle.pack(src)


def run(tmp_path: Path, body: Callable[[Bundles], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        store = SQLiteStore(tmp_path / "ember.db")
        await store.open()
        layers = Layers(tmp_path / "layers", PackageIndex(), 60, 1 << 30)
        bundles = Bundles(
            tmp_path / "code", LocalBlobs(tmp_path / "blobs"), store, retention=2, layers=layers
        )
        try:
            await body(bundles)
        finally:
            await bundles.close()
            await store.close()

    asyncio.run(main())


async def _deploy(bundles: Bundles, data: bytes) -> tuple[str, bool]:
    """What a deploy does with a bundle's bytes: unpack to staging, install, keep the blob."""
    staging = bundles.staging()
    await asyncio.to_thread(bundle.unpack, data, staging)
    digest = hashlib.sha256(data).hexdigest()
    created = await bundles.install(staging, digest)
    await bundles.remove([staging])
    await bundles.put_new(data, digest)
    return digest, created


class SlowRemoval:
    """shutil.rmtree held until released, noting whether it ran on an event loop's thread."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.on_loop: list[bool] = []
        self.removed: list[Path] = []

    def __call__(self, path: Path, ignore_errors: bool = False) -> None:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        assert self.release.wait(10)
        self.removed.append(Path(path))
        real_rmtree(path, ignore_errors=ignore_errors)


real_rmtree = shutil.rmtree


def test_a_removal_frees_the_name_at_once_and_deletes_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowRemoval()
    monkeypatch.setattr("ember.api.bundles.shutil.rmtree", slow)
    data = _bundle(tmp_path, "def handle(req, ctx):\n    return 'v1'\n")

    async def body(bundles: Bundles) -> None:
        slow.release.set()  # the staging directory of the first deploy is already gone
        digest, created = await _deploy(bundles, data)
        assert created
        code = bundles.code_dir(digest)
        slow.release.clear()
        await bundles.remove([code])  # returns while the deletion is held
        assert not code.exists()
        # A deploy of the same bundle meanwhile unpacks it anew, and the deletion under way
        # does not touch it.
        again, created = await _deploy(bundles, data)
        assert (again, created) == (digest, True)
        slow.release.set()
        await bundles.close()
        assert (code / "handler.py").read_text() == "def handle(req, ctx):\n    return 'v1'\n"
        assert sorted(p.name for p in code.parent.iterdir()) == [digest]  # no trash left

    run(tmp_path, body)
    assert slow.on_loop and not any(slow.on_loop)
    assert all(path.name.startswith(".trash-") for path in slow.removed)


def test_only_bundles_no_revision_uses_are_dropped(tmp_path: Path) -> None:
    used = _bundle(tmp_path, "def handle(req, ctx):\n    return 'used'\n")
    unused = _bundle(tmp_path, "def handle(req, ctx):\n    return 'unused'\n")

    async def body(bundles: Bundles) -> None:
        kept, _ = await _deploy(bundles, used)
        gone, _ = await _deploy(bundles, unused)
        await bundles.store.add_revision("default/f", FunctionSpec(name="f"), "h", kept, 1.0)
        await bundles.drop_unused({kept, gone})
        await bundles.close()
        assert bundles.code_dir(kept).is_dir() and not bundles.code_dir(gone).exists()
        assert set(bundles.blobs.all()) == {kept}

    run(tmp_path, body)


def test_the_start_sweeps_what_a_shutdown_left(tmp_path: Path) -> None:
    data = _bundle(tmp_path, "def handle(req, ctx):\n    return 'left'\n")

    async def body(bundles: Bundles) -> None:
        digest, _ = await _deploy(bundles, data)  # no revision uses it
        for leftover in (".tmp-0123456789abcdef", ".trash-0123456789abcdef"):
            (bundles.root / leftover / "sub").mkdir(parents=True)
        await bundles.sweep()
        await bundles.close()
        assert list(bundles.root.iterdir()) == []
        assert list(bundles.blobs.all()) == []
        # A blob whose code directory is gone is unpacked again on demand.
        assert await bundles.put_new(data, digest)
        assert (await bundles.ensure_code(digest)).joinpath("handler.py").is_file()

    run(tmp_path, body)
