"""Names and addresses of functions: "namespace/name" keys, namespace names, public URLs."""

from __future__ import annotations

from ember import manifest
from ember.errors import UserError

DEFAULT_NS = "default"


def qualified(namespace: str, name: str) -> str:
    """A function's key everywhere in the control plane and the store."""
    return f"{namespace}/{name}"


def validate_namespace(namespace: str) -> str:
    if not manifest.NAME_RE.match(namespace):
        raise UserError(
            f"namespace {namespace[:80]!r} is invalid: {manifest.NAME_RULE}", code="bad_name"
        )
    return namespace


class Address:
    """Where functions are reached; the port is the bound one once the server listens (a
    configured port 0 picks one)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def url(self, namespace: str, name: str) -> str:
        path = name if namespace == DEFAULT_NS else f"{namespace}/{name}"
        return f"http://{self.host}:{self.port}/fn/{path}"
