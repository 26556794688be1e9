"""Every failure the control plane reports, in one hierarchy.

Each API family turns these into its own shape: LLaVA's protocol into an error frame
with ``error_code``, the OpenAI API into ``{"error": {...}}`` with an HTTP status, the
admin API into ``{"detail": ...}``.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "ColdStartTimeout",
    "Conflict",
    "Forbidden",
    "ModelLoadFailed",
    "NoWorker",
    "NodeFailed",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "ServiceError",
    "Unauthorized",
    "UnknownModel",
    "WorkerUnreachable",
]

# LLaVA protocol error codes (1-3 are LLaVA's own).
LLAVA_NODE_ERROR = 1
LLAVA_NO_WORKER = 2
LLAVA_UNREACHABLE = 3
LLAVA_OVERLOADED = 4
LLAVA_BAD_REQUEST = 5


class ServiceError(Exception):
    """A failure with a message for the client, an HTTP status and a LLaVA error code."""

    status_code = 500
    llava_code = LLAVA_NODE_ERROR
    openai_type = "server_error"
    openai_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(ServiceError):
    """The request is malformed or out of range."""

    status_code = 400
    llava_code = LLAVA_BAD_REQUEST
    openai_type = "invalid_request_error"


class PayloadTooLarge(BadRequest):
    """The request body is larger than the limit."""

    status_code = 413
    openai_code = "request_too_large"


class Unauthorized(ServiceError):
    """No or wrong credentials."""

    status_code = 401
    openai_type = "authentication_error"
    openai_code = "invalid_api_key"


class Forbidden(ServiceError):
    """Credentials are valid but not for this."""

    status_code = 403
    openai_type = "permission_error"


class NotFound(ServiceError):
    """No such resource."""

    status_code = 404
    openai_type = "invalid_request_error"
    openai_code = "not_found"


class Conflict(ServiceError):
    """The request contradicts the current state (e.g. unloading a pinned model)."""

    status_code = 409
    openai_type = "invalid_request_error"
    openai_code = "conflict"


class UnknownModel(NotFound):
    """No node has ever listed this model."""

    llava_code = LLAVA_NO_WORKER
    openai_code = "model_not_found"


class NoWorker(ServiceError):
    """The model is known but no healthy node has it ready."""

    status_code = 503
    llava_code = LLAVA_NO_WORKER
    openai_type = "service_unavailable"
    openai_code = "no_healthy_worker"


class Overloaded(ServiceError):
    """Every node serving the model is at capacity and the wait queue is full."""

    status_code = 429
    llava_code = LLAVA_OVERLOADED
    openai_type = "rate_limit_error"
    openai_code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WorkerUnreachable(ServiceError):
    """The node could not be reached, or stopped answering mid-stream."""

    status_code = 502
    llava_code = LLAVA_UNREACHABLE
    openai_type = "service_unavailable"
    openai_code = "worker_unreachable"


class NodeFailed(ServiceError):
    """The node answered with an error."""

    status_code = 502
    llava_code = LLAVA_NODE_ERROR
    openai_type = "server_error"
    openai_code = "worker_error"


class ColdStartTimeout(NoWorker):
    """The model is being loaded for this request but was not ready within the cold-start timeout."""

    openai_code = "model_loading"


class ModelLoadFailed(NodeFailed):
    """Loading the model on a node failed (the message names the model, the node and the cause)."""

    openai_code = "model_load_failed"
