"""The function spec: what `ember.yaml` declares for one function, as the server stores it."""

from __future__ import annotations

from typing import Any

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


class BackoffSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The wait before retry N (N = 1, 2, ...): `initial * factor ** (N - 1)`, capped at `max`,
    then drawn uniformly from [wait * (1 - jitter), wait] (ember.queue.policy)."""

    initial: float = 1.0  # seconds
    max: float = 300.0  # seconds; every wait is capped
    factor: float = 2.0
    jitter: float = 0.5  # 0: none; 1: "full jitter"


class Destination(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where an async invocation's result record goes when it ends: exactly one is set."""

    function: str = ""  # another function of the same namespace, invoked asynchronously
    url: str = ""  # POSTed with bounded retries
    subject: str = ""  # a NATS subject (only with `ember up --queue nats://...`)


RETRYABLE = ("5xx", "429", "timeout", "crash")


class AsyncSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the function's async invocations are retried, aged and bounded (docs/async.md)."""

    retries: int = 2  # attempts after the first
    backoff: BackoffSpec = BackoffSpec()
    # Outcomes retried: "5xx", "429", "timeout", "crash", or a status code such as "503".
    retry_on: tuple[str, ...] = RETRYABLE
    max_age: float = 6 * 3600.0  # seconds from acceptance; older ones expire instead of running
    concurrency: int = 0  # of its async invocations running at once; 0: scale.max x concurrency
    on_success: Destination | None = None
    on_failure: Destination | None = None


class TriggerSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One entry of `triggers:` as declared; checked when it is deployed or added, not here,
    so `--allow-trigger-errors` can keep a wrong one (ember.triggers.plan)."""

    name: str
    type: str
    config: dict[str, Any] = {}  # the source's own keys (url, subject, schedule, ...)
    filter: list[Any] = []  # [{attribute, exact | prefix | suffix}]
    delivery: dict[str, Any] = {}  # {mode, concurrency, order_by, batch, structured}


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
    async_: AsyncSpec = msgspec.field(default_factory=AsyncSpec, name="async")
    triggers: list[TriggerSpec] = []

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
                out[field.encode_name] = nested
        elif value != field.default and not (
            field.default_factory is not msgspec.NODEFAULT and value == field.default_factory()
        ):
            out[field.encode_name] = msgspec.to_builtins(value, order="sorted")
    return dict(sorted(out.items()))


class Quota(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Limits of one namespace (tenant); 0 = unlimited."""

    functions: int = 0
    instances: int = 0  # running at once
    memory_mb: int = 0  # of running instances at once (each counts its memory: setting)
