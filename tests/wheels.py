"""A wheelhouse of small local packages, made by the tests (no network, no build backend): a
wheel is a zip with the package, its METADATA, WHEEL and a RECORD of hashes."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def make_wheel(
    house: Path,
    name: str,
    version: str,
    module: str | None = None,
    requires: tuple[str, ...] = (),
    extra: dict[str, str] | None = None,
    payload_bytes: int = 0,
) -> Path:
    """`name`-`version`, pure Python: `import <module>` gives `__version__` and `NAME`.
    `payload_bytes` adds a data file of that size (for disk-use tests)."""
    module = module or name.replace("-", "_")
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\nNAME = {name!r}\n",
        **(extra or {}),
    }
    contents = {path: text.encode() for path, text in files.items()}
    if payload_bytes:
        contents[f"{module}/payload.bin"] = bytes(payload_bytes)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {req}" for req in requires]
    contents[f"{dist}.dist-info/METADATA"] = ("\n".join(meta) + "\n").encode()
    contents[f"{dist}.dist-info/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: ember-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = [f"{path},{_record_hash(data)},{len(data)}" for path, data in contents.items()]
    record.append(f"{dist}.dist-info/RECORD,,")
    contents[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    house.mkdir(parents=True, exist_ok=True)
    path = house / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name_in_zip, data in contents.items():
            zf.writestr(name_in_zip, data)
    return path


def make_sdist(house: Path, name: str, version: str) -> Path:
    """A source distribution only: installing it would run its setup.py."""
    dist = f"{name}-{version}"
    buf = io.BytesIO()
    files = {
        f"{dist}/setup.py": "from setuptools import setup\nsetup()\n",
        f"{dist}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/pyproject.toml": '[build-system]\nrequires = ["setuptools"]\n',
    }
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    house.mkdir(parents=True, exist_ok=True)
    out = house / f"{dist}.tar.gz"
    out.write_bytes(buf.getvalue())
    return out


BACKEND = """
import base64, hashlib, os, socket, zipfile

NAME, VERSION = {name!r}, {version!r}
MODULE = NAME.replace("-", "_")
DIST = f"{{MODULE}}-{{VERSION}}"
METADATA = f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n"
WHEEL = "Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"


def _observe():
    seen = {{"uid": os.getuid(), "hostname": socket.gethostname()}}
    seen["saw_ember_home"] = os.path.exists({ember_home!r})
    {extra}
    return seen


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = os.path.join(metadata_directory, f"{{DIST}}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(METADATA)
    return f"{{DIST}}.dist-info"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {{
        f"{{MODULE}}/__init__.py": f"__version__ = {{VERSION!r}}\\nSEEN = {{_observe()!r}}\\n",
        f"{{DIST}}.dist-info/METADATA": METADATA,
        f"{{DIST}}.dist-info/WHEEL": WHEEL,
    }}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{{path}},sha256={{digest.decode()}},{{len(text.encode())}}")
    record.append(f"{{DIST}}.dist-info/RECORD,,")
    files[f"{{DIST}}.dist-info/RECORD"] = "\\n".join(record) + "\\n"
    name = f"{{DIST}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return name
"""


def make_built_sdist(
    house: Path, name: str, version: str, ember_home: str, extra: str = "pass"
) -> Path:
    """A source distribution whose in-tree build backend (no build requirements) records, in
    the wheel it builds, what its build could see; `extra` is more of the backend's code, run
    while it builds (to overrun a limit)."""
    dist = f"{name.replace('-', '_')}-{version}"
    backend = BACKEND.format(name=name, version=version, ember_home=ember_home, extra=extra)
    files = {
        f"{dist}/backend.py": backend,
        f"{dist}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/pyproject.toml": (
            '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
            f'[project]\nname = "{name}"\nversion = "{version}"\n'
        ),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    house.mkdir(parents=True, exist_ok=True)
    out = house / f"{dist}.tar.gz"
    out.write_bytes(buf.getvalue())
    return out
