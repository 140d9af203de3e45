"""Typed errors: each says what went wrong and what to change, and maps to one gRPC status."""

from __future__ import annotations


class BatonError(Exception):
    """Base of every error Baton raises on purpose.

    `grpc_status` names the `grpc.StatusCode` member the router answers with, so the mapping lives
    beside the error rather than in a table somewhere else.
    """

    grpc_status: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(BatonError):
    """The request itself is malformed: empty prompt, bad sampling value, unknown field.

    `param` names the request field at fault, when one is (the OpenAI error's `param`).
    """

    grpc_status = "INVALID_ARGUMENT"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt plus max tokens does not fit the model's context (or the whole KV cache)."""


class ModelNotFoundError(BatonError):
    """The model named by the caller does not exist at that path, in the cache or on the hub."""

    grpc_status = "NOT_FOUND"


class ModelLoadError(BatonError):
    """The model exists but cannot be loaded: a corrupt file, an unsupported architecture."""

    grpc_status = "FAILED_PRECONDITION"


class ConfigError(BatonError):
    """A configuration value is out of range or inconsistent with the machine."""

    grpc_status = "INVALID_ARGUMENT"


class CapacityError(BatonError):
    """No room now: queue full, or no KV blocks for a request that would otherwise fit."""

    grpc_status = "RESOURCE_EXHAUSTED"


class RequestNotFoundError(BatonError):
    """A request id that the engine does not know (finished long ago, or never added)."""

    grpc_status = "NOT_FOUND"


class EngineError(BatonError):
    """The engine failed while running a batch; the requests in that batch end with this error."""

    grpc_status = "INTERNAL"


class KVTransferError(BatonError):
    """A KV transfer was rejected or did not complete: bad chunk, wrong shape, stalled, refused."""

    grpc_status = "ABORTED"


class WorkerUnavailableError(BatonError):
    """No live worker could take the request, or its worker died after tokens were streamed.

    Nothing of the request is left in the cluster; sending it again is safe.
    """

    grpc_status = "UNAVAILABLE"


class RedisStartError(BatonError):
    """The local redis-server did not start: binary missing, port taken, or it never answered."""

    grpc_status = "UNAVAILABLE"


class ClusterNotRunningError(BatonError):
    """No Baton cluster (its controller actor) is running where the caller looked."""

    grpc_status = "UNAVAILABLE"


class KubeConfigError(BatonError):
    """No usable kubeconfig: the file is missing, or names no such context."""

    grpc_status = "FAILED_PRECONDITION"


class ReleaseNotFoundError(BatonError):
    """No Helm-installed Baton (its RayCluster) under that release name in that namespace."""

    grpc_status = "NOT_FOUND"


class KubeAccessError(BatonError):
    """The Kubernetes API refused the caller's credentials (401) or its RBAC role (403)."""

    grpc_status = "PERMISSION_DENIED"


class KubeAPIError(BatonError):
    """The Kubernetes API could not be reached, or failed a request for another reason."""

    grpc_status = "UNAVAILABLE"


class WorkerNotFoundError(BatonError):
    """A worker id the controller does not know: never started, or already stopped."""

    grpc_status = "NOT_FOUND"


class DeadlineError(BatonError):
    """A request ran past the deadline its caller set; it was stopped and its blocks freed."""

    grpc_status = "DEADLINE_EXCEEDED"


class AuthError(BatonError):
    """A call without the cluster's token (or with a wrong one)."""

    grpc_status = "UNAUTHENTICATED"


def as_baton_error(exc: BaseException) -> BatonError | None:
    """The `BatonError` behind `exc`: itself, or the cause a Ray task error wraps."""
    if isinstance(exc, BatonError) and hasattr(exc, "message"):
        return exc
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BatonError) else None


class PlanError(BatonError):
    """The capacity planner found nothing to offer: no layout meets the SLOs, the rate or budget."""

    grpc_status = "FAILED_PRECONDITION"


class JobServerError(BatonError):
    """No Ray job server (the dashboard) answers at the address the caller gave."""

    grpc_status = "UNAVAILABLE"


class JobNotFoundError(BatonError):
    """A Ray job id (or submission id) the job server does not know."""

    grpc_status = "NOT_FOUND"
