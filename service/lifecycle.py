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
from service.engine_tuning import freeze_startup_objects
from service.errors import NotReadyError, ShuttingDownError, some_names
from service.metrics import ServiceMetrics, service_metrics
from service.schemas import RowResult
from service.settings import Settings
from service.types import AdapterDescription, ClassifyRequest

log = logging.getLogger("cogalora.service")


class Repository(Protocol):
    """The repository as the HTTP layer uses it (``service.repository.ModelRepository``)."""

    max_loaded: int

    @property
    def failures(self) -> dict[str, str]: ...
    def names(self) -> list[str]: ...
    def resolve(self, requested: str | None) -> str: ...
    def adapters(self) -> list[AdapterDescription]: ...
    def info(self, name: str) -> AdapterDescription: ...
    def loaded_names(self) -> list[str]: ...
    def load(self, name: str, replace: bool = False) -> AdapterDescription: ...
    def unload(self, name: str) -> None: ...


class BatcherLike(Protocol):
    queue_depth: int

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def submit(self, request: ClassifyRequest) -> list[RowResult]: ...


ComponentFactory = Callable[[Settings, ServiceMetrics], Awaitable[tuple[Repository, BatcherLike]]]


async def build_components(settings: Settings, metrics: ServiceMetrics) -> tuple[Repository, BatcherLike]:
    """The real engine side: in its own process (``engine_process``, the default) or in this one.

    Either way the routes get a repository (names, metadata, admin changes) and an
    :class:`~service.engine_client.EngineClient` to submit to; the engine starts (and the service
    turns ready) when the client's ``start`` returns.
    """
    from service.catalogue import Catalogue
    from service.engine_client import EngineClient, LocalTransport, RemoteRepository
    from service.engine_core import EngineCore

    if not settings.engine_process:
        core = await asyncio.to_thread(EngineCore.build, settings, metrics)
        return core.repository, EngineClient(settings, core.repository.catalogue, LocalTransport(core))
    from service.process_pool import ProcessPool
    from service.process_transport import ProcessTransport

    catalogue = Catalogue(settings.model_dir)
    await asyncio.to_thread(catalogue.scan)
    repository = RemoteRepository(catalogue, settings.max_loaded_adapters, metrics)
    processes = settings.resolved_engine_processes()
    payload = engine_settings(settings)
    if processes == 1:
        transport = ProcessTransport(payload, repository, repository.on_ready)
    else:
        transport = ProcessPool(processes, payload, repository, repository.on_ready)
    repository.attach(transport, asyncio.get_running_loop())
    return repository, EngineClient(settings, catalogue, transport)


def engine_settings(settings: Settings) -> dict:
    """The settings each engine process builds from: every field but the secrets (it needs none), with its
    share of the lanes and the threads resolved for all of them (so processes do not oversubscribe the cores)."""
    secret = {name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)}
    payload = settings.model_dump(mode="json", exclude=secret)
    processes = settings.resolved_engine_processes()
    payload["engine_lanes"] = max(1, settings.resolved_engine_lanes() // processes)
    payload["torch_threads"] = settings.resolved_torch_threads()
    payload["engine_processes"] = 1
    return payload


class Service:
    """What the routes share: settings, metrics, the engine side and the lifecycle state."""

    def __init__(self, settings: Settings, components: ComponentFactory) -> None:
        self.settings = settings
        self.metrics = service_metrics(settings)
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
        freeze_startup_objects()
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

    @property
    def serving(self) -> bool:
        """Ready and its engine up (a restarting engine process makes /ready 503 for a while)."""
        return self.state == "ready" and getattr(self.batcher, "ready", True)

    def require_ready(self) -> tuple[Repository, BatcherLike]:
        if self.state == "draining":
            raise ShuttingDownError("the server is shutting down", retry_after=self.settings.retry_after_s)
        if self.repository is None or self.batcher is None:
            reason = "loading the models failed" if self.state == "failed" else "models are not loaded yet"
            raise NotReadyError(reason, retry_after=self.settings.retry_after_s)
        if not getattr(self.batcher, "ready", True):
            raise NotReadyError("the engine is restarting; retry shortly", retry_after=self.settings.retry_after_s)
        return self.repository, self.batcher
