"""The function spec: what `ember.yaml` declares for one function, as the server stores it."""

from __future__ import annotations

import msgspec

MAX_TIMEOUT_S = 15 * 60.0


class ScaleSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    min: int = 0
    max: int = 10
    idle: float = 60.0  # seconds without requests before scaling to zero (the idle grace)
    target: float = 0.0  # concurrent requests per instance the autoscaler aims at; 0 = concurrency
    window: float = 60.0  # seconds of the stable window (mean concurrency)
    panic_window: float = 6.0  # seconds of the panic window
    down_rate: float = 2.0  # one scale-down step keeps at least ceil(current / down_rate)


class SecretRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str  # a secret of the function's namespace, at /run/secrets/NAME
    env: str = ""  # also as this environment variable, when set


class FunctionSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    handler: str = "handler.handle"  # module.function, relative to `source`
    source: str = "."  # directory inside the bundle, POSIX, relative
    memory: int = 128  # MB per instance
    timeout: float = 30.0  # seconds
    concurrency: int = 1  # requests served at once by one instance
    scale: ScaleSpec = ScaleSpec()
    env: dict[str, str] = {}
    network: str = "host"  # host | none (own network namespace, loopback only)
    access: str = "public"  # public: anyone may invoke over /fn; private: an invoke key
    cpu: float = 0.0  # cores all instances together may use; 0 = a fair share, no cap
    pids: int = 256  # processes and threads of the revision (zygote and instances)
    tmp: int = 64  # MB of the private /tmp (counted in the memory of whoever writes)
    secrets: list[SecretRef] = []
    # Modules its layer zygote imports once, beside the layer's packages its handler's module
    # imports (ember.pool.layer_zygotes); [] = only those.
    preload: list[str] = []

    @property
    def module(self) -> str:
        return self.handler.rpartition(".")[0]

    @property
    def attribute(self) -> str:
        return self.handler.rpartition(".")[2]


def canonical(spec: FunctionSpec) -> bytes:
    """Deterministic bytes of a spec, for hashing a revision. Fields at their default are left
    out, so a new setting with a default does not change the hash of existing revisions."""
    return msgspec.json.encode(_without_defaults(spec))


def _without_defaults(struct: msgspec.Struct) -> dict[str, object]:
    out: dict[str, object] = {}
    for field in msgspec.structs.fields(struct):
        value = getattr(struct, field.name)
        if isinstance(value, msgspec.Struct):
            nested = _without_defaults(value)
            if nested:
                out[field.name] = nested
        elif value != field.default and not (
            field.default_factory is not msgspec.NODEFAULT and value == field.default_factory()
        ):
            out[field.name] = msgspec.to_builtins(value, order="sorted")
    return dict(sorted(out.items()))


class Quota(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Limits of one namespace (tenant); 0 = unlimited."""

    functions: int = 0
    instances: int = 0  # running at once
    memory_mb: int = 0  # of running instances at once (each counts its memory: setting)
