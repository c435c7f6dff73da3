"""The data that flows between the HTTP layer, the batcher and the engine.

Interfaces (implemented in ``repository.py``, ``engine.py``, ``batcher.py``; used by ``app.py``)::

    repository = ModelRepository(model_dir, device="cpu")    # loads every checkpoint folder
    repository.load_all(); repository.load(name); repository.unload(name)
    repository.adapters() -> list[AdapterInfo]; repository.info(name) -> AdapterInfo
    engine = Engine(repository)          # one routed forward over a mixed-adapter batch
    engine.prepare(request) -> list[PreparedRow]     # tokenize; raises InputTooLongError / UnknownAdapterError
    engine.run(rows) -> list[RowResult | ServiceError]
    engine.warmup()
    batcher = Batcher(engine, BatcherConfig(...), listener)  # asyncio dynamic batching
    await batcher.start(); await batcher.stop()      # stop drains: queued work is answered first
    await batcher.submit(request) -> list[RowResult]         # raises ServiceError subclasses
    batcher.queue_depth (rows waiting), batcher.inflight (requests accepted, not yet answered)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ClassifyRequest:
    """One validated ``POST /classify`` call (the HTTP layer checks sizes and types first)."""

    texts: list[str]
    adapter: str
    threshold: float | None = None
    """Per-request tau override; ``None`` uses the adapter's calibrated tau."""
    truncate: bool = True
    """False: an input longer than the adapter's max_length is an InputTooLongError (413)."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    base_model: str
    method: str
    labels: list[str]
    tau: float
    max_length: int
    total_adapters: int
    """Adapter modules this adapter has (sites with LoRA weights)."""
    site_names: list[str]
    """Every adapter site of the base model, ``layer.<i>.<kind>``."""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RowResult:
    """The answer for one input text."""

    label: str
    score: float
    scores: list[dict[str, Any]]
    """``[{"label": ..., "score": ...}]`` for every label, highest first."""
    active_adapters: int
    total_adapters: int
    active_modules: list[str]
    tokens: int
    flops: dict[str, float]
    """``{"total", "adapter", "adapter_saved"}`` for this input alone."""
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": self.score,
            "scores": self.scores,
            "active_adapters": self.active_adapters,
            "total_adapters": self.total_adapters,
            "active_modules": self.active_modules,
            "tokens": self.tokens,
            "flops": self.flops,
        }


@dataclass(frozen=True)
class BatchStats:
    """What one engine forward did, for metrics."""

    rows: int
    requests: int
    padded_tokens: int
    real_tokens: int
    adapters: dict[str, int]
    """adapter name -> rows in this batch"""
    inference_seconds: float
    adapter_rows_multiplied: int


class BatchListener(Protocol):
    def on_batch(self, stats: BatchStats) -> None: ...
