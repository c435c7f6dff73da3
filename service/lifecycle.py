"""The service's lifecycle: build the engine side in the background, serve, drain.

``/health`` answers at once; ``/ready`` turns 200 once the repository is scanned, its base encoders
are loaded, the preloaded adapters are in memory and the engine is warmed up; a drain (SIGTERM)
turns it back to 503 while accepted requests finish. Checkpoint folders that cannot be served are
logged one warning each and do not hold readiness back, unless ``require_all_adapters`` is set:
then they fail the start like any loading error, and ``failure`` says why (``python -m service``
exits with it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

from service.about import runtime
from service.errors import NotReadyError, ShuttingDownError, some_names
from service.metrics import AdapterLabels, ServiceMetrics
from service.schemas import AdapterInfo, RowResult
from service.settings import Settings
from service.types import BatchListener, ClassifyRequest

log = logging.getLogger("cogalora.service")


class Repository(Protocol):
    """The repository as the HTTP layer uses it (``service.repository.ModelRepository``)."""

    max_loaded: int

    @property
    def failures(self) -> dict[str, str]: ...
    def names(self) -> list[str]: ...
    def resolve(self, requested: str | None) -> str: ...
    def adapters(self) -> list[AdapterInfo]: ...
    def info(self, name: str) -> AdapterInfo: ...
    def loaded_names(self) -> list[str]: ...
    def load(self, name: str, replace: bool = False) -> AdapterInfo: ...
    def unload(self, name: str) -> None: ...


class BatcherLike(Protocol):
    queue_depth: int

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def submit(self, request: ClassifyRequest) -> list[RowResult]: ...


ComponentFactory = Callable[[Settings, ServiceMetrics], Awaitable[tuple[Repository, BatcherLike]]]


def build_engine(settings: Settings, metrics: ServiceMetrics):
    """Scan the model repository, load its encoders and the preloaded adapters, warm up (blocking)."""
    import torch

    from service.engine import Engine
    from service.repository import ModelRepository

    torch.set_num_threads(settings.resolved_torch_threads())
    repository = ModelRepository(
        settings.model_dir,
        device=settings.resolved_device(),
        dtype=settings.resolved_dtype(),
        max_loaded=settings.max_loaded_adapters,
        listener=metrics,
    )
    repository.scan()
    repository.load_encoders()
    repository.preload(settings.preload_adapters)
    engine = Engine(repository, shadow_fraction=settings.shadow_fraction)
    engine.warmup()
    return repository, engine


def make_batcher(engine, settings: Settings, listener: BatchListener | None):
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


async def build_components(settings: Settings, metrics: ServiceMetrics) -> tuple[Repository, BatcherLike]:
    """The real repository, engine and batcher; loading and warm-up run off the event loop."""
    repository, engine = await asyncio.to_thread(build_engine, settings, metrics)
    return repository, make_batcher(engine, settings, metrics)


class Service:
    """What the routes share: settings, metrics, the engine side and the lifecycle state."""

    def __init__(self, settings: Settings, components: ComponentFactory) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics(AdapterLabels(settings.metrics_adapter_labels), settings.drift_window)
        self.metrics.queue_capacity.set(settings.max_queue)
        self.components = components
        self.repository: Repository | None = None
        self.batcher: BatcherLike | None = None
        self.state: Literal["loading", "ready", "failed", "draining"] = "loading"
        self.failure: str | None = None
        """Why loading failed, for the operator (server paths included)."""
        self.ready_event = asyncio.Event()
        self.admin_lock = asyncio.Lock()
        """Serializes admin loads and unloads."""
        self._loader: asyncio.Task[None] | None = None
        self.metrics.bind(
            lambda: float(self.batcher.queue_depth) if self.batcher is not None else 0.0,
            lambda: float(len(self.repository.loaded_names())) if self.repository is not None else 0.0,
            lambda: float(len(self.repository.names())) if self.repository is not None else 0.0,
        )

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
            unavailable = repository.failures
            if unavailable and self.settings.require_all_adapters:
                reasons = [f"{name}: {unavailable[name]}" for name in sorted(unavailable)]
                self.failure = (
                    f"{len(unavailable)} checkpoint folder(s) cannot be served ({some_names(reasons, limit=3)}): "
                    "fix or remove them, or unset COGALORA_REQUIRE_ALL_ADAPTERS to serve the others"
                )
            else:
                await batcher.start()
        except Exception as exc:
            log.exception("loading the model repository failed")
            self.failure = f"loading the model repository failed: {str(exc) or type(exc).__name__}"
        if self.failure is not None:
            self.state = "failed"
            self.ready_event.set()
            return
        self.repository, self.batcher = repository, batcher
        if self.state == "loading":
            self.state = "ready"
        names = repository.names()
        log.info(
            "ready",
            extra={
                **runtime(self.settings),
                "adapters": len(names),
                "adapter_names": some_names(names),
                "loaded": repository.loaded_names(),
                "unavailable": sorted(unavailable),
                "load_seconds": round(time.perf_counter() - started, 3),
            },
        )
        self.ready_event.set()

    def begin_drain(self) -> None:
        """Stop admitting work: /ready turns 503, new requests get 503; accepted ones finish."""
        if self.state != "draining":
            log.info("draining: no new requests; finishing accepted ones")
        self.state = "draining"

    async def stop(self) -> None:
        """Drain the batcher (admitted rows are answered first), then stop."""
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
