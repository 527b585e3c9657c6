"""One error hierarchy, split by who is at fault; the one place that maps it to HTTP and exit codes.

Every error carries a stable machine `code` and a message that says what happened, to what,
and what to do.
"""

from __future__ import annotations


class EmberError(Exception):
    """Root of every error Ember raises on purpose."""

    status: int = 500
    code: str = "internal"
    exit_code: int = 1

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.detail = detail  # e.g. a traceback from user code

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail:
            body["detail"] = self.detail
        return {"error": body}


class UserError(EmberError):
    """The caller sent something wrong: bad names, bad YAML, bad bundles, unknown functions."""

    status = 400
    code = "bad_request"
    exit_code = 2


class NotFound(UserError):
    status = 404
    code = "not_found"


class TooLarge(UserError):
    status = 413
    code = "too_large"


class Conflict(UserError):
    """The thing is not in a state that allows this (an invocation already running)."""

    status = 409
    code = "conflict"


class RequirementsError(UserError):
    """A function's requirements cannot be taken, resolved or installed (nothing is deployed)."""

    status = 422
    code = "bad_requirements"


class BadTrigger(UserError):
    """A trigger's settings are wrong or its broker cannot be reached (at deploy or add)."""

    status = 422
    code = "bad_trigger"


class FunctionError(EmberError):
    """The function's own code failed: import errors, crashes, timeouts, memory."""

    status = 502
    code = "function_error"
    exit_code = 3


class DeployRejected(FunctionError):
    status = 422
    code = "deploy_rejected"


class FunctionTimeout(FunctionError):
    status = 504
    code = "timeout"


class FunctionMemoryExceeded(FunctionError):
    status = 502
    code = "memory_limit"


class FunctionCrashed(FunctionError):
    status = 502
    code = "crashed"


class CapacityError(EmberError):
    """No room right now: queues full, limits reached. Retrying later may succeed."""

    status = 429
    code = "capacity"
    exit_code = 4


class PlatformError(EmberError):
    """Ember itself failed (a zygote died, the store is unreachable)."""

    status = 503
    code = "platform"
    exit_code = 5


class IsolationUnavailable(PlatformError):
    """`--require-isolation` and the host lacks a protection."""

    code = "isolation_unavailable"


class Unauthorized(UserError):
    """No API key, or one that is unknown or revoked."""

    status = 401
    code = "unauthorized"


class Forbidden(UserError):
    """A valid key without the scope the call needs."""

    status = 403
    code = "forbidden"


class QuotaExceeded(UserError):
    """A namespace's quota would be exceeded by a deploy (4xx; invocations get 429)."""

    status = 403
    code = "quota_exceeded"


class RateLimited(CapacityError):
    """A key spent its token bucket."""

    code = "rate_limited"


class QuotaReached(CapacityError):
    """An invocation would start an instance beyond its namespace's quota."""

    code = "quota_exceeded"
