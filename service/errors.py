"""Errors a request can meet, each mapped to one HTTP status and one ``error_type``.

Raised anywhere in the service (repository, engine, batcher, app) and turned into the
error envelope ``{"error": ..., "error_type": ...}`` by the app. Messages are written
for the client: they never contain server paths or request text.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

#: Adapter names an error message lists at most ("a, b, c, d, e and 12 more").
NAMES_SHOWN = 5
#: Past this many adapters, an unknown name gets no "did you mean" (it would cost the event loop).
SUGGESTION_CANDIDATES = 2000


def some_names(names: Sequence[str], limit: int = NAMES_SHOWN) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown


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
    def among(cls, available: Sequence[str]) -> AdapterRequiredError:
        """No adapter named, and not exactly one to choose from (``available``: the caller's to see)."""
        if not available:
            return cls(
                "no adapter is being served: /adapters lists the folders that cannot be, and an admin adds one "
                "with POST /adapters/{name}"
            )
        return cls(f"'adapter' is required: {len(available)} adapters are available ({some_names(available)})")


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
    def among(cls, name: str, available: Sequence[str]) -> UnknownAdapterError:
        """The error for ``name``, with the closest available name and the first few (``name`` bounded).

        ``available`` is what the caller may see: an adapter outside a key's scope gets exactly the answer
        of a missing one, and the names offered are the key's own."""
        shown = name if len(name) <= 64 else name[:64] + "..."
        if not available:
            return cls(f"unknown adapter {shown!r}: no adapter is available")
        close = (
            difflib.get_close_matches(name[:64], available, n=1, cutoff=0.6)
            if len(available) <= SUGGESTION_CANDIDATES
            else []
        )
        guess = f" did you mean {close[0]!r}?" if close else ""
        return cls(f"unknown adapter {shown!r};{guess} available: {some_names(available)}")


class AdapterUnloadedError(ServiceError):
    """The adapter was removed while the request waited in the queue."""

    status_code = 404
    error_type = "adapter_unloaded"


class AdapterReplacedError(ServiceError):
    """The adapter's folder was replaced between tokenization and the engine (the API retries once)."""

    status_code = 503
    error_type = "adapter_replaced"


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


class InvalidArchiveError(ServiceError):
    """An uploaded adapter archive is unreadable, or holds something an adapter folder may not."""

    status_code = 422
    error_type = "invalid_archive"


class AdapterSourceUnavailableError(ServiceError):
    """An adapter source (a Hugging Face Hub id) cannot be reached and is not in the local cache."""

    status_code = 422
    error_type = "adapter_source_unavailable"


class AdapterSourceNotFoundError(ServiceError):
    """The hub answered: no such repository or revision (or no access to it)."""

    status_code = 404
    error_type = "adapter_source_not_found"


class ModelDirReadOnlyError(ServiceError):
    """The service cannot write to its model directory, so adapters cannot be added or removed at runtime."""

    status_code = 403
    error_type = "model_dir_read_only"


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
