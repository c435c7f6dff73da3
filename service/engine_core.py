"""The engine side of the service: resident adapters, the engine and its batcher, nothing of HTTP.

:class:`EngineCore` takes tokenized requests and returns the engine's numbers; it runs inside the
engine process (``service.engine_process``), or in the API process itself (``engine_process=false``,
and in each Ray Serve replica). What it reports (batches, adapter loads and evictions) goes to an
:class:`EngineEvents` listener: the service metrics, or the channel to the API process.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from service.batcher import Batcher, BatcherConfig
from service.engine import Engine
from service.repository import ModelRepository
from service.settings import Settings
from service.types import BatchStats, RowOutput, TokenizedRequest

logger = logging.getLogger(__name__)

#: Divisors of 12: with these intra-op thread counts every element-wise kernel cuts the encoder's
#: tensors (hidden sizes multiples of 384) at whole vectors, so no element falls in a scalar tail in
#: one batch and a vector lane in another (``cogalora.int8`` explains why that matters).
INVARIANT_THREAD_COUNTS = (1, 2, 3, 4, 6, 12)


class EngineEvents(Protocol):
    """What the engine reports (``service.metrics.ServiceMetrics`` implements it)."""

    def on_batch(self, stats: BatchStats) -> None: ...
    def on_adapter_loaded(self, name: str, seconds: float) -> None: ...
    def on_adapter_evicted(self, name: str) -> None: ...


def build_engine(
    settings: Settings, events: EngineEvents | None, owns_model_dir: bool = True
) -> tuple[ModelRepository, Engine]:
    """Scan the model repository, load its encoders and the preloaded adapters, warm up (blocking).

    ``owns_model_dir``: this process finishes installs a crash interrupted (``service.uploads``); an
    engine process leaves that to the API process, which writes the installs.
    """
    import torch

    from cogalora import int8_kernels

    torch.set_num_threads(engine_threads(settings.resolved_torch_threads()))
    kernels = int8_kernels.select(settings.int8_kernels)
    repository = ModelRepository(
        settings.model_dir,
        device=settings.resolved_device(),
        precision=settings.resolved_precision(),
        max_loaded=settings.max_loaded_adapters,
        listener=events,
        lanes=settings.resolved_engine_lanes(),
    )
    repository.catalogue.scan(recover=owns_model_dir)
    repository.load_encoders()
    repository.preload(settings.preload_adapters)
    engine = Engine(repository, shadow_fraction=settings.shadow_fraction)
    engine.warmup()
    engine.release_memory()  # what loading dropped: e.g. each lane's own copy of the frozen weights
    logger.info(
        "engine ready",
        extra={
            "precision": repository.precision.name,
            "int8_kernels": kernels,
            "lanes": repository.lanes,
            "threads_per_lane": torch.get_num_threads(),
            "loaded": repository.loaded_names(),
        },
    )
    return repository, engine


def make_batcher(engine: Engine, settings: Settings, listener: EngineEvents | None) -> Batcher:
    """The dynamic batcher over ``engine``, configured from the settings."""
    config = BatcherConfig(
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
    )
    return Batcher(engine, config, listener)


def engine_threads(requested: int) -> int:
    """The intra-op thread count to run with: the largest invariant one not above ``requested``."""
    return max(count for count in INVARIANT_THREAD_COUNTS if count <= max(1, requested))


class EngineCore:
    """Resident adapters + engine + batcher; ``classify`` a tokenized request, ``call`` an admin change."""

    ADMIN_METHODS = ("load", "unload")
    """Repository methods the API process may call (``call``)."""

    def __init__(self, repository: ModelRepository, batcher: Batcher) -> None:
        self.repository = repository
        self.batcher = batcher

    @classmethod
    def build(cls, settings: Settings, events: EngineEvents | None, owns_model_dir: bool = True) -> EngineCore:
        """The engine of ``settings``, loaded and warmed up (blocking; see :func:`build_engine`)."""
        repository, engine = build_engine(settings, events, owns_model_dir)
        return cls(repository, make_batcher(engine, settings, events))

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self) -> None:
        """Answer every admitted request, then stop."""
        await self.batcher.stop()

    async def classify(self, request: TokenizedRequest) -> list[RowOutput]:
        return await self.batcher.submit(request)

    def call(self, method: str, *args: Any) -> None:
        """An admin change of the resident adapters (blocking: run it on a worker thread). The caller reads
        what changed from its own catalogue."""
        if method not in self.ADMIN_METHODS:
            raise ValueError(f"unknown engine call {method!r}")
        getattr(self.repository, method)(*args)
