"""What the data plane runs: one revision of one function, as the control plane published it."""

from __future__ import annotations

import msgspec

from ember.spec import FunctionSpec


class Target(msgspec.Struct, frozen=True):
    function: str
    number: int  # revision number
    sha256: str
    code_dir: str  # content-addressed, read-only
    spec: FunctionSpec

    @property
    def key(self) -> tuple[str, int, str]:
        """Numbers restart after `ember rm`, so the content hash is part of the identity."""
        return (self.function, self.number, self.sha256)

    @property
    def label(self) -> str:
        return f"{self.function}@{self.number}"
