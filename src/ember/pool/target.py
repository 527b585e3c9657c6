"""What the data plane runs: one revision of one function, as the control plane published it.

Its names are computed once (`functools.cached_property`): the hot path asks for `key` and
`qualified` about ten times per request."""

from __future__ import annotations

import functools

import msgspec

from ember.spec import FunctionSpec

RevisionKey = tuple[str, str, int, str]  # namespace, function, number, sha256 + generation


class Target(msgspec.Struct, frozen=True, dict=True):  # a __dict__ for the cached names
    function: str
    number: int  # revision number
    sha256: str
    code_dir: str  # content-addressed, read-only
    spec: FunctionSpec
    namespace: str = "default"
    uid: int = 0  # the namespace's unprivileged uid and gid inside sandboxes; 0: not sandboxed
    # Decrypted values of the secrets the spec lists; never logged, never sent to clients.
    secrets: dict[str, bytes] = msgspec.field(default_factory=dict)
    # Changes when a secret's value does: the revision then gets a new pool (and zygote) while
    # requests on the old one finish.
    generation: str = ""
    layer_dir: str = ""  # its requirements, installed (ember.layers); "": none
    # Host directories its sandbox shows read-only at the same path: only Ember's own builds
    # (the operator's wheelhouse); never set from a function's spec.
    binds: tuple[str, ...] = ()

    @functools.cached_property
    def key(self) -> RevisionKey:
        """Numbers restart after `ember rm`, so the content hash is part of the identity."""
        return (self.namespace, self.function, self.number, self.sha256 + self.generation)

    @functools.cached_property
    def qualified(self) -> str:
        """ "namespace/name": the function's key in the store, records and routes."""
        return f"{self.namespace}/{self.function}"

    @functools.cached_property
    def label(self) -> str:
        prefix = "" if self.namespace == "default" else f"{self.namespace}/"
        return f"{prefix}{self.function}@{self.number}"

    @property
    def slug(self) -> str:
        """A file-name-safe unique name: cgroups and instance ids."""
        return f"{self.namespace}.{self.function}.{self.number}.{self.sha256[:10]}{self.generation}"

    def __repr__(self) -> str:  # keeps secret values out of any log line or traceback
        return f"Target({self.label}, sha256={self.sha256[:12]})"
