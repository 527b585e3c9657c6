"""Bundles: a function directory as a deterministic tar.gz.

`pack` runs on the CLI side, `unpack` on the server (it trusts nothing in the archive), and
`tree_hash` names an unpacked tree by its content.
"""

from ember.bundle.pack import DEFAULT_IGNORES, IGNORE_FILE, pack
from ember.bundle.tree import MANIFEST_NAMES, read_manifest, tree_hash
from ember.bundle.unpack import MAX_DEPTH, MAX_FILES, MAX_PATH_BYTES, MAX_UNPACKED_BYTES, unpack

__all__ = [
    "DEFAULT_IGNORES",
    "IGNORE_FILE",
    "MANIFEST_NAMES",
    "MAX_DEPTH",
    "MAX_FILES",
    "MAX_PATH_BYTES",
    "MAX_UNPACKED_BYTES",
    "pack",
    "read_manifest",
    "tree_hash",
    "unpack",
]
