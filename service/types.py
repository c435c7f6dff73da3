"""The data that flows between the HTTP layer, the batcher and the engine (wire schemas: ``schemas.py``).

The request path (API process | engine process, see ``service/engine_client.py``)::

    routes.classify            validate the body (schemas.ClassifyBody, check_texts), resolve the adapter
      -> EngineClient.submit   admission (rows in flight), tokenize (long requests on a thread) -> TokenizedRequest
      |  Batcher.submit        pin the adapter (loading it if needed), queue the rows
      |  Engine.run_batch      one routed forward per length chunk of a mixed-adapter batch -> RowOutput
      -> results.row_result    labels, scores, site names: the wire RowResult, per input, in input order
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class AdapterDescription:
    """What the catalogue says of one servable adapter (``GET /adapters`` adds whether it is loaded)."""

    name: str
    base_model: str
    method: str
    labels: list[str]
    tau: float
    max_length: int
    """Longest input in tokens: the checkpoint's, capped by the encoder."""
    total_adapters: int
    """Sites of its LoRA configuration (target modules x layers)."""
    sites: list[str]
    """Those sites by name, in the encoder's site order."""
    dropped_sites: list[str]
    """Sites of the configuration that carry no adapter (pruned after training): always off."""
    rank: int
    rank_set: list[int] | None = None
    """RAD-LoRA: the ranks its routers choose from per input."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Training-time metrics from ``cogalora.json``."""


@dataclass(frozen=True)
class ClassifyRequest:
    """One validated classification job (the HTTP layer checked sizes, types and the threshold)."""

    texts: list[str]
    adapter: str
    threshold: float | None = None
    """Per-request tau override; ``None`` uses the adapter's tau."""
    truncate: bool = True
    """False: an input longer than the adapter's max_length is an InputTooLongError (413)."""
    client: str = ""
    """Who sent it (a key id): the batcher shares its queue and its batches fairly between clients."""


@dataclass(frozen=True)
class TokenizedRequest:
    """A classification job as the engine takes it: token ids, no text."""

    adapter: str
    ids: list[list[int]]
    """Token ids per input, truncated to the adapter's max_length."""
    input_tokens: list[int]
    """Tokens per input before truncation."""
    threshold: float | None = None
    """Per-request tau override; ``None`` uses the adapter's tau."""
    client: str = ""
    """Who sent it (a key id): the batcher shares its queue and its batches fairly between clients."""
    revision: str = ""
    """The catalogue revision of the adapter it was tokenized for (empty: whichever is loaded)."""


@dataclass
class RowOutput:
    """What the engine computed for one input: numbers and indices, no names (``service.results`` adds them)."""

    probabilities: list[float]
    """Per label of the adapter, in its label order."""
    logits: list[float]
    active_sites: list[int]
    """Indices, in the encoder's site order, of the sites whose adapter ran."""
    active_ranks: list[int]
    """The rank each of ``active_sites`` used."""
    flops: tuple[int, int, int]
    """``(total, adapter, adapter_saved)``."""
    tokens: int
    input_tokens: int
    inference_seconds: float = 0.0
    queue_seconds: float = 0.0


@dataclass(frozen=True)
class ShadowOutcome:
    """One shadow dense check: a routed row compared with the same row with every gate on."""

    adapter: str
    agree: bool
    """Whether the routed label equals the dense (plain-LoRA) label."""
    score_difference: float
    """``|p_routed(label) - p_dense(label)|`` for the label the routed row returned."""


@dataclass(frozen=True)
class RoutingSample:
    """Gate counts of one adapter's rows in one forward, at the sites its drift reference covers."""

    adapter: str
    rows: int
    active: tuple[int, ...]
    """Per reference site: rows whose gate was on."""
    reference: tuple[float, ...]
    """Per reference site: the activation rate measured on dev data at the same tau."""


@dataclass(frozen=True)
class BatchStats:
    """What one engine batch did, for metrics."""

    rows: int
    forwards: int
    """Routed forwards the batch took (one per length chunk)."""
    padded_tokens: int
    """Tokens the forwards really ran, padding included."""
    real_tokens: int
    inference_seconds: float
    adapter_rows_multiplied: int
    """(row, site) pairs multiplied by an adapter: the adapter work actually done."""
    shadow: tuple[ShadowOutcome, ...] = ()
    """Shadow dense checks run in this batch (their rows are not counted in ``rows``)."""
    routing: tuple[RoutingSample, ...] = ()
    """Gate counts of the rows served at their adapter's own tau, for routing drift."""


class BatchListener(Protocol):
    def on_batch(self, stats: BatchStats) -> None: ...
