"""The HTTP layer (DESIGN.md §5): FastAPI routes, auth, limits, one error envelope, metrics and access logs.

``create_app(settings)`` builds an app whose lifespan loads the model repository in the background
(``/health`` answers at once, ``/ready`` turns 200 once every adapter is loaded and warmed up), runs
the dynamic batcher, and drains it on shutdown.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    AdapterConflictError,
    AdapterRequiredError,
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceError,
    ShuttingDownError,
    UnauthorizedError,
    UnknownAdapterError,
)
from service.logs import ACCESS_LOGGER
from service.metrics import CONTENT_TYPE, UNKNOWN_ADAPTER, ServiceMetrics
from service.settings import Settings
from service.types import AdapterInfo, BatchListener, ClassifyRequest, RowResult

log = logging.getLogger("cogalora.service")
access_log = logging.getLogger(ACCESS_LOGGER)

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ADAPTER_NAME = re.compile(ADAPTER_NAME_PATTERN)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_PROTECTED_PREFIXES = ("/classify", "/adapters")
_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 422: "invalid_request"}


class NotReadyError(ServiceError):
    """The models are still loading (or failed to load)."""

    status_code = 503
    error_type = "not_ready"


class CheckpointLoadError(ServiceError):
    """An admin load named a folder that is not a servable checkpoint (the repository's own error type)."""

    status_code = 422
    error_type = "adapter_load_failed"


# ----------------------------------------------------------------------------------------------
# The engine side, as the app uses it (service/types.py documents the real classes).


class Repository(Protocol):
    def adapters(self) -> list[AdapterInfo]: ...
    def load(self, name: str) -> Any: ...
    def unload(self, name: str) -> Any: ...


class BatcherLike(Protocol):
    queue_depth: int
    inflight: int

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def submit(self, request: ClassifyRequest) -> list[RowResult]: ...


ComponentFactory = Callable[[Settings, BatchListener], Awaitable[tuple[Repository, BatcherLike]]]


def load_engine(settings: Settings) -> tuple[Any, Any]:
    """Load every checkpoint of the model repository and warm the engine up (blocking)."""
    from service.engine import Engine
    from service.repository import ModelRepository

    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    repository = ModelRepository(settings.model_dir, device=settings.resolved_device())
    repository.load_all()
    engine = Engine(repository)
    engine.warmup()
    return repository, engine


def make_batcher(engine: Any, settings: Settings, listener: BatchListener) -> BatcherLike:
    """The dynamic batcher over ``engine``, configured from the settings."""
    from service.batcher import Batcher, BatcherConfig

    config = BatcherConfig(
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
    )
    return Batcher(engine, config, listener)


async def build_components(settings: Settings, listener: BatchListener) -> tuple[Repository, BatcherLike]:
    """The real repository, engine and batcher; loading and warm-up run off the event loop."""
    repository, engine = await asyncio.to_thread(load_engine, settings)
    return repository, make_batcher(engine, settings, listener)


# ----------------------------------------------------------------------------------------------
# Schemas (they are the OpenAPI documentation too).


class ErrorBody(BaseModel):
    """The one error envelope of every non-2xx answer."""

    error: str = Field(description="What went wrong, for a human.")
    error_type: str = Field(description="Machine-readable kind, e.g. unknown_adapter, queue_full, timeout.")


class ClassifyBody(BaseModel):
    """``POST /classify`` request."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"inputs": ["a great movie", "the plot was awful"], "adapter": "sst2"}]},
    )

    inputs: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="One text or a non-empty list of texts; the answer is always a list in input order."
    )
    adapter: str | None = Field(None, description="Adapter to use; optional when exactly one is loaded.")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Gate threshold tau for this request; default: the adapter's tau."
    )
    truncate: bool = Field(True, description="Truncate long inputs to the adapter's max_length; false: 413.")


class LabelScore(BaseModel):
    label: str
    score: float


class Flops(BaseModel):
    total: float
    adapter: float
    adapter_saved: float


class RowOut(BaseModel):
    """The answer for one input."""

    label: str
    score: float
    scores: list[LabelScore] = Field(description="Every label, highest score first.")
    active_adapters: int = Field(description="Adapter modules that ran for this input.")
    total_adapters: int = Field(description="Adapter modules the adapter has.")
    active_modules: list[str] = Field(description="Sites that ran, e.g. layer.0.attention.query.")
    tokens: int
    flops: Flops


class ClassifyResponse(BaseModel):
    adapter: str
    results: list[RowOut]


class AdapterOut(BaseModel):
    name: str
    base_model: str
    method: str
    labels: list[str]
    tau: float
    max_length: int
    total_adapters: int
    metrics: dict[str, Any]


class AdaptersResponse(BaseModel):
    adapters: list[AdapterOut]


class StatusResponse(BaseModel):
    status: str


class UnloadResponse(BaseModel):
    name: str
    status: Literal["unloaded"] = "unloaded"


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in codes}


def adapter_json(info: AdapterInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "base_model": info.base_model,
        "method": info.method,
        "labels": list(info.labels),
        "tau": info.tau,
        "max_length": info.max_length,
        "total_adapters": info.total_adapters,
        "metrics": dict(info.metrics),
    }


# ----------------------------------------------------------------------------------------------
# Lifecycle.


class Service:
    """What the routes share: settings, metrics, the engine side and the lifecycle state."""

    def __init__(self, settings: Settings, components: ComponentFactory) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.components = components
        self.repository: Repository | None = None
        self.batcher: BatcherLike | None = None
        self.state: Literal["loading", "ready", "failed", "draining"] = "loading"
        self.ready_event = asyncio.Event()
        self._loader: asyncio.Task[None] | None = None
        self._admin_lock = asyncio.Lock()
        self.metrics.bind(self._queue_depth, self._adapters_loaded)

    def _queue_depth(self) -> float:
        return float(self.batcher.queue_depth) if self.batcher is not None else 0.0

    def _adapters_loaded(self) -> float:
        return float(len(self.repository.adapters())) if self.repository is not None else 0.0

    async def start(self) -> None:
        """Begin loading in the background; the server answers /health meanwhile."""
        self.state = "loading"
        self.repository, self.batcher = None, None
        self.ready_event = asyncio.Event()
        self._loader = asyncio.create_task(self._load(), name="cogalora-load")

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            repository, batcher = await self.components(self.settings, self.metrics)
            await batcher.start()
        except Exception:
            log.exception("loading the model repository failed")
            self.state = "failed"
            self.ready_event.set()
            return
        self.repository, self.batcher = repository, batcher
        if self.state == "loading":
            self.state = "ready"
        names = [info.name for info in repository.adapters()]
        failures = getattr(repository, "failures", {})
        if failures:
            log.warning("some checkpoints were skipped", extra={"skipped": sorted(failures)})
        log.info(
            "ready",
            extra={"adapters": names, "load_seconds": round(time.perf_counter() - started, 3)},
        )
        self.ready_event.set()

    def begin_drain(self) -> None:
        """Stop admitting work: /ready turns 503, new /classify calls get 503; accepted ones finish."""
        if self.state != "draining":
            log.info("draining: no new requests; finishing accepted ones")
        self.state = "draining"

    async def stop(self) -> None:
        """Drain the batcher (queued rows are answered first), then stop."""
        self.begin_drain()
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.stop()
        log.info("stopped")

    def require_ready(self) -> tuple[Repository, BatcherLike]:
        if self.state == "draining":
            raise ShuttingDownError("the server is shutting down", retry_after=self.settings.retry_after_s)
        if self.repository is None or self.batcher is None:
            reason = "loading the models failed" if self.state == "failed" else "models are not loaded yet"
            raise NotReadyError(reason, retry_after=self.settings.retry_after_s)
        return self.repository, self.batcher


# ----------------------------------------------------------------------------------------------
# Errors.


def _short(value: str, limit: int = 64) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def error_response(status: int, message: str, error_type: str, retry_after: float | None = None) -> JSONResponse:
    headers = {}
    if retry_after is not None or status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def service_error_response(exc: ServiceError) -> JSONResponse:
    return error_response(exc.status_code, exc.message, exc.error_type, exc.retry_after)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    """A short, path-free message that never echoes the offending input."""
    if any(err.get("type") == "json_invalid" for err in errors):
        return "malformed JSON body"
    parts = []
    for err in errors[:3]:
        loc = [_short(str(p), 40) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {_short(str(err.get('msg', 'invalid')), 120)}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(list(exc.errors())), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): a malformed request
            return error_response(422, "malformed request body", "invalid_request")
        error_type = _ERROR_TYPES.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, str(exc.detail), error_type)
        for key, value in (exc.headers or {}).items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal server error", "internal_error")


# ----------------------------------------------------------------------------------------------
# The outer middleware: request id, auth, body size limit, access log and request metrics.


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _is_protected(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in _PROTECTED_PREFIXES)


def _key_matches(scope: Scope, key: str) -> bool:
    expected = key.encode()
    offered = _header(scope, b"x-api-key")
    authorization = _header(scope, b"authorization")
    if authorization and authorization[:7].lower() == "bearer ":
        offered = authorization[7:].strip()
    return hmac.compare_digest((offered or "").encode("utf-8", "replace"), expected)


class EdgeMiddleware:
    """Everything that must happen before (and around) routing, as plain ASGI."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        offered_id = _header(scope, b"x-request-id")
        request_id = offered_id if offered_id and _REQUEST_ID.match(offered_id) else uuid.uuid4().hex
        info: dict[str, Any] = {"request_id": request_id}
        scope.setdefault("state", {})["cogalora"] = info
        status = 500
        path, method = scope.get("path", ""), scope.get("method", "")
        counted = path == "/classify" and method == "POST"
        shown_path = _short(path, 200)  # client-controlled: bounded in the log

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        if counted:
            self.service.metrics.inflight.inc()
        try:
            rejection = self._check_auth(scope)
            if rejection is None:
                receive, rejection = await self._buffer_body(scope, receive)
            if rejection is not None:
                await rejection(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            adapter = info.get("adapter", UNKNOWN_ADAPTER)
            if counted:
                self.service.metrics.inflight.dec()
                self.service.metrics.observe_request(adapter, status, elapsed)
            access_log.info(
                "%s %s %s",
                method,
                shown_path,
                status,
                extra={
                    "request_id": request_id,
                    "method": method,
                    "path": shown_path,
                    "status": status,
                    "adapter": info.get("adapter"),
                    "inputs": info.get("inputs"),
                    "latency_ms": round(elapsed * 1000, 3),
                },
            )

    def _check_auth(self, scope: Scope) -> Response | None:
        key = self.service.settings.api_key_value()
        if key is None or not _is_protected(scope.get("path", "")):
            return None
        if _key_matches(scope, key):
            return None
        return service_error_response(UnauthorizedError("missing or invalid API key"))

    async def _buffer_body(self, scope: Scope, receive: Receive) -> tuple[Receive, Response | None]:
        """Read the whole body up to the limit (Content-Length first, then the streamed size)."""
        limit = self.service.settings.max_body_bytes
        too_large = service_error_response(PayloadTooLargeError(f"request body exceeds {limit} bytes"))
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            return receive, too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([], message, receive), None  # client went away; let the app see it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return receive, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay(chunks, None, receive), None


def _replay(chunks: list[bytes], pending: Message | None, receive: Receive) -> Receive:
    """A receive callable that first yields the buffered body, then defers to the real one."""
    queue: list[Message] = [pending] if pending else [{"type": "http.request", "body": b"".join(chunks)}]

    async def replay() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replay


# ----------------------------------------------------------------------------------------------
# The app.


AdapterName = Annotated[
    str, PathParam(pattern=ADAPTER_NAME_PATTERN, max_length=64, description="Checkpoint folder name.")
]


def _service(request: Request) -> Service:
    return request.app.state.service


def _resolve_adapter(repository: Repository, requested: str | None) -> str:
    names = [info.name for info in repository.adapters()]
    if requested is None:
        if len(names) == 1:
            return names[0]
        raise AdapterRequiredError(f"'adapter' is required: {len(names)} adapters are loaded")
    if requested not in names:
        raise UnknownAdapterError(f"unknown adapter {_short(requested)!r}")
    return requested


def _check_sizes(texts: list[str], settings: Settings) -> None:
    if len(texts) > settings.max_client_batch:
        raise PayloadTooLargeError(f"{len(texts)} inputs; at most {settings.max_client_batch} per request")
    for index, text in enumerate(texts):
        if len(text) > settings.max_input_chars:
            raise PayloadTooLargeError(f"input {index} has {len(text)} characters; at most {settings.max_input_chars}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(f"input {index} is not valid Unicode text (lone surrogate)") from None


def _validated_name(name: str) -> str:
    if not _ADAPTER_NAME.match(name):
        raise InvalidRequestError("adapter name must match " + ADAPTER_NAME_PATTERN)
    return name


def create_app(settings: Settings | None = None, components: ComponentFactory | None = None) -> FastAPI:
    """Build the app; ``components`` replaces the real repository/engine/batcher (tests)."""
    settings = settings or Settings()
    service = Service(settings, components or build_components)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="CoGaLoRA Serve",
        version="0.1.0",
        summary="Text classification with conditionally gated LoRA adapters.",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, service=service)

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=_errors(401, 404, 413, 422, 429, 503, 504),
        summary="Classify one text or a list of texts with an adapter.",
    )
    async def classify(body: ClassifyBody, request: Request) -> Response:
        svc = _service(request)
        info = request.scope["state"]["cogalora"]
        texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
        info["inputs"] = len(texts)
        _check_sizes(texts, svc.settings)
        repository, batcher = svc.require_ready()
        adapter = _resolve_adapter(repository, body.adapter)
        info["adapter"] = adapter
        if log.isEnabledFor(logging.DEBUG):
            log.debug("classify", extra={"request_id": info["request_id"], "prefix": _short(texts[0], 16)})
        job = ClassifyRequest(texts=texts, adapter=adapter, threshold=body.threshold, truncate=body.truncate)
        try:
            results = await asyncio.wait_for(batcher.submit(job), svc.settings.request_timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(
                f"no answer within {svc.settings.request_timeout_s:g} s", retry_after=svc.settings.retry_after_s
            ) from None
        queue_s, inference_s = svc.metrics.observe_results(adapter, results)
        content = {"adapter": adapter, "results": [row.to_json() for row in results]}
        headers = {"X-Queue-Time-Ms": f"{queue_s * 1000:.3f}", "X-Inference-Time-Ms": f"{inference_s * 1000:.3f}"}
        return JSONResponse(content, headers=headers)

    @app.get("/health", response_model=StatusResponse, summary="Liveness: 200 while the process runs.")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        response_model=StatusResponse,
        responses=_errors(503),
        summary="Readiness: 200 once every adapter is loaded and warmed up; 503 before and while draining.",
    )
    async def ready(request: Request) -> Response:
        svc = _service(request)
        if svc.state == "ready":
            return JSONResponse({"status": "ready"})
        return error_response(503, f"not ready: {svc.state}", "not_ready", svc.settings.retry_after_s)

    @app.get(
        "/adapters",
        response_model=AdaptersResponse,
        responses=_errors(401, 503),
        summary="The loaded adapters: base model, labels, method, tau, metrics.",
    )
    async def adapters(request: Request) -> dict[str, Any]:
        repository, _ = _service(request).require_ready()
        return {"adapters": [adapter_json(info) for info in repository.adapters()]}

    @app.post(
        "/adapters/{name}",
        status_code=201,
        response_model=AdapterOut,
        responses=_errors(401, 404, 409, 422, 503),
        summary="Admin: load the checkpoint folder <model_dir>/<name>.",
    )
    async def load_adapter(name: AdapterName, request: Request) -> dict[str, Any]:
        svc = _service(request)
        repository, _ = svc.require_ready()
        name = _validated_name(name)
        root = Path(svc.settings.model_dir).resolve()
        folder = (root / name).resolve()
        if folder.parent != root or not folder.is_dir():
            raise UnknownAdapterError(f"no checkpoint folder {name!r} in the model repository")
        async with svc._admin_lock:
            if any(info.name == name for info in repository.adapters()):
                raise AdapterConflictError(f"adapter {name!r} is already loaded")
            try:
                await asyncio.to_thread(repository.load, name)
            except ServiceError:
                raise
            except Exception as exc:
                log.warning("loading adapter failed", extra={"adapter": name, "reason": str(exc)})
                raise CheckpointLoadError(f"folder {name!r} is not a loadable checkpoint") from None
        request.scope["state"]["cogalora"]["adapter"] = name
        info = next(info for info in repository.adapters() if info.name == name)
        log.info("adapter loaded", extra={"adapter": name})
        return adapter_json(info)

    @app.delete(
        "/adapters/{name}",
        response_model=UnloadResponse,
        responses=_errors(401, 404, 422, 503),
        summary="Admin: unload an adapter (requests still queued for it get 404 adapter_unloaded).",
    )
    async def unload_adapter(name: AdapterName, request: Request) -> dict[str, str]:
        svc = _service(request)
        repository, _ = svc.require_ready()
        name = _validated_name(name)
        async with svc._admin_lock:
            if not any(info.name == name for info in repository.adapters()):
                raise UnknownAdapterError(f"adapter {name!r} is not loaded")
            await asyncio.to_thread(repository.unload, name)
        log.info("adapter unloaded", extra={"adapter": name})
        return {"name": name, "status": "unloaded"}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition."}},
        summary="Prometheus metrics.",
    )
    async def metrics(request: Request) -> Response:
        return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE)

    return app
