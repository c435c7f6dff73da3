"""The data that flows between the HTTP layer, the batcher and the engine (wire schemas: ``schemas.py``).

The request path::

    routes.classify          validate the body (schemas.ClassifyBody, check_texts), resolve the adapter
      -> Batcher.submit      admission (queue room), pin the adapter (loading it if needed),
                             tokenize off the event loop, queue the rows
      -> Engine.run_batch    one routed forward per length chunk of a mixed-adapter batch (worker thread)
      -> RowResult           per input, in input order
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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
