"""Errors a request can meet, each mapped to one HTTP status and one ``error_type``.

Raised anywhere in the service (repository, engine, batcher, app) and turned into the
error envelope ``{"error": ..., "error_type": ...}`` by the app. Messages are written
for the client: they never contain server paths or request text.
"""

from __future__ import annotations


class ServiceError(Exception):
    status_code: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidRequestError(ServiceError):
    status_code = 422
    error_type = "invalid_request"


class AdapterRequiredError(ServiceError):
    status_code = 422
    error_type = "adapter_required"

    @classmethod
    def among(cls, available: int) -> AdapterRequiredError:
        """No adapter named, and ``available`` (not exactly one) adapters to choose from."""
        return cls(f"'adapter' is required: {available} adapters are available")


class UnauthorizedError(ServiceError):
    status_code = 401
    error_type = "unauthorized"


class ForbiddenError(ServiceError):
    """A valid key (or none, where none is needed) that may not do this: admin routes, the catalogue."""

    status_code = 403
    error_type = "forbidden"


class RateLimitedError(ServiceError):
    """The key's requests or input rows per second are used up; ``retry_after`` says when they refill."""

    status_code = 429
    error_type = "rate_limited"


class UnknownAdapterError(ServiceError):
    status_code = 404
    error_type = "unknown_adapter"

    @classmethod
    def named(cls, name: str) -> UnknownAdapterError:
        """The one answer for an adapter a caller cannot use: absent, or outside its key's scope."""
        shown = name if len(name) <= 64 else name[:64] + "..."
        return cls(f"unknown adapter {shown!r}")


class AdapterUnloadedError(ServiceError):
    """The adapter was removed while the request waited in the queue."""

    status_code = 404
    error_type = "adapter_unloaded"


class AdapterLoadError(ServiceError):
    """A checkpoint folder exists but cannot be served (damaged, ``method: full``, wrong base)."""

    status_code = 422
    error_type = "adapter_load_failed"


class AdapterCapacityError(ServiceError):
    """Every loaded adapter is in use by queued work, so another one cannot be loaded yet."""

    status_code = 503
    error_type = "adapters_busy"


class AdapterConflictError(ServiceError):
    status_code = 409
    error_type = "adapter_conflict"


class PayloadTooLargeError(ServiceError):
    status_code = 413
    error_type = "payload_too_large"


class InputTooLongError(ServiceError):
    status_code = 413
    error_type = "input_too_long"


class QueueFullError(ServiceError):
    status_code = 503
    error_type = "queue_full"


class NotReadyError(ServiceError):
    """The models are still loading (or failed to load)."""

    status_code = 503
    error_type = "not_ready"


class ShuttingDownError(ServiceError):
    status_code = 503
    error_type = "shutting_down"


class RequestTimeoutError(ServiceError):
    status_code = 504
    error_type = "timeout"


class InferenceError(ServiceError):
    """The engine failed on this request (never on its batch-mates)."""

    status_code = 500
    error_type = "inference_error"
