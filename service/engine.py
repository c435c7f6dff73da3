"""The execution engine: tokenization, one routed forward per base model for a mixed batch, per-row results.

``prepare`` turns a request into :class:`PreparedRow` objects (token ids, adapter slot, tau).
``run`` takes rows of any adapters and thresholds, groups them by base model, sorts them by length
and cuts the sorted rows into a few length chunks where that saves more padded tokens than a
forward costs (see :func:`length_chunks`); every chunk is one routed forward that mixes adapters
and taus freely. Results are built from the forward's logits and gates: labels, sorted scores,
active modules and the analytic FLOPs of each row on its own length.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch

from service.errors import (
    AdapterUnloadedError,
    InferenceError,
    InputTooLongError,
    InvalidRequestError,
    ServiceError,
)
from service.repository import BaseModel, LoadedAdapter, ModelRepository
from service.types import BatchListener, BatchStats, ClassifyRequest, RowResult

logger = logging.getLogger(__name__)

#: Fixed cost of one forward, in padded tokens, when deciding whether to cut a batch by length.
DEFAULT_CHUNK_OVERHEAD_TOKENS = 48


@dataclass(frozen=True)
class PreparedRow:
    """One tokenized input, bound to one load of one adapter."""

    adapter: str
    generation: int
    """The adapter load this row was prepared for (a reload or unload invalidates it)."""
    slot: int
    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...] | None
    tau: float
    request_id: int
    index: int
    """Position of the input within its request."""

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class EngineRun:
    """What :meth:`Engine.run_batch` returns: per-row results (in input order) and per-batch stats."""

    results: list[RowResult | ServiceError]
    stats: list[BatchStats]


def length_chunks(lengths: list[int], overhead_tokens: int) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into contiguous chunks minimising padded tokens + overhead per chunk.

    A chunk of ``n`` rows padded to its longest row ``T`` costs ``n * T + overhead_tokens``. Exact
    dynamic programme over the distinct lengths (cuts never fall between equal lengths).
    Returns ``[(start, stop)]`` index ranges.
    """
    if not lengths:
        return []
    if overhead_tokens < 0:
        return [(0, len(lengths))]
    # Ends of runs of equal length: the only useful cut points.
    ends = [i + 1 for i in range(len(lengths)) if i + 1 == len(lengths) or lengths[i + 1] != lengths[i]]
    best = [0] + [0] * len(ends)
    cut = [0] * (len(ends) + 1)
    starts = [0, *ends]
    for j in range(1, len(ends) + 1):
        stop = ends[j - 1]
        width = lengths[stop - 1]
        best[j], cut[j] = min((best[i] + (stop - starts[i]) * width + overhead_tokens, i) for i in range(j))
    chunks = []
    j = len(ends)
    while j > 0:
        i = cut[j]
        chunks.append((starts[i], ends[j - 1]))
        j = i
    return chunks[::-1]


def tune_allocator() -> bool:
    """Stop glibc from returning large activation buffers to the OS after every forward.

    Without this, each forward maps and page-faults fresh memory for its big activations; measured
    on MiniLM at batch 32 that costs 5-15 % of CPU time. Process-wide; a no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)
        return bool(ok and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):
        return False


class Engine:
    """Runs mixed-adapter batches on the repository's shared base models."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        listener: BatchListener | None = None,
        num_threads: int | None = None,
        split_by_length: bool = True,
        chunk_overhead_tokens: int = DEFAULT_CHUNK_OVERHEAD_TOKENS,
        tune_malloc: bool = True,
        force_gates: Literal["on", "off"] | None = None,
    ) -> None:
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        self.repository = repository
        self.listener = listener
        self.split_by_length = split_by_length
        self.chunk_overhead_tokens = chunk_overhead_tokens
        self.force_gates = force_gates
        """Diagnostics and benchmarks only: every present adapter on ("on") or none ("off")."""
        if tune_malloc and repository.device.type == "cpu":
            tune_allocator()
        self._request_ids = itertools.count()

    # ---- preparation --------------------------------------------------------------------------

    def prepare(self, request: ClassifyRequest) -> list[PreparedRow]:
        """Tokenize a request for its adapter; raises Unknown/Invalid/InputTooLong errors."""
        adapter = self.repository.get(request.adapter)
        if not request.texts:
            raise InvalidRequestError("inputs is empty: send at least one text")
        tau = adapter.meta.tau if request.threshold is None else float(request.threshold)
        if not 0.0 <= tau <= 1.0:
            raise InvalidRequestError(f"threshold must lie in [0, 1], got {request.threshold}")
        encoded = self._tokenize(adapter, list(request.texts), request.truncate)
        request_id = next(self._request_ids)
        type_ids = encoded.get("token_type_ids")
        return [
            PreparedRow(
                adapter=adapter.name,
                generation=adapter.generation,
                slot=adapter.slot,
                input_ids=tuple(ids),
                token_type_ids=tuple(type_ids[i]) if type_ids is not None else None,
                tau=tau,
                request_id=request_id,
                index=i,
            )
            for i, ids in enumerate(encoded["input_ids"])
        ]

    def _tokenize(self, adapter: LoadedAdapter, texts: list[str], truncate: bool) -> dict:
        base = adapter.base
        limit = adapter.max_length
        with base.tokenizer_lock:
            encoded = base.tokenizer(texts, truncation=truncate, max_length=limit if truncate else None)
        if not truncate:
            for i, ids in enumerate(encoded["input_ids"]):
                if len(ids) > limit:
                    raise InputTooLongError(
                        f"input {i} has {len(ids)} tokens; adapter {adapter.name!r} accepts at most {limit} "
                        "(shorten it or send truncate=true)"
                    )
        return encoded

    # ---- execution ----------------------------------------------------------------------------

    def run(self, rows: list[PreparedRow]) -> list[RowResult | ServiceError]:
        """Results in the order of ``rows``; a failing row gets its own error, never its batch-mates'."""
        outcome = self.run_batch(rows)
        if self.listener is not None:
            for stats in outcome.stats:
                self.listener.on_batch(stats)
        return outcome.results

    def run_batch(self, rows: list[PreparedRow]) -> EngineRun:
        """Like :meth:`run`, and also the :class:`BatchStats` of each base model's batch."""
        results: list[RowResult | ServiceError | None] = [None] * len(rows)
        groups: dict[int, tuple[BaseModel, list[int]]] = {}
        adapters: dict[tuple[str, int], LoadedAdapter] = {}
        for position, row in enumerate(rows):
            adapter = self._current(row)
            if adapter is None:
                results[position] = _unloaded(row)
                continue
            adapters[(row.adapter, row.generation)] = adapter
            groups.setdefault(id(adapter.base), (adapter.base, []))[1].append(position)
        stats = []
        for base, positions in groups.values():
            stats.append(self._run_base(base, rows, positions, adapters, results))
        return EngineRun(results=results, stats=stats)  # type: ignore[arg-type]

    def _current(self, row: PreparedRow) -> LoadedAdapter | None:
        try:
            adapter = self.repository.get(row.adapter)
        except ServiceError:
            return None
        return adapter if adapter.generation == row.generation else None

    def _run_base(
        self,
        base: BaseModel,
        rows: list[PreparedRow],
        positions: list[int],
        adapters: dict[tuple[str, int], LoadedAdapter],
        results: list,
    ) -> BatchStats:
        positions = sorted(positions, key=lambda p: rows[p].tokens)
        lengths = [rows[p].tokens for p in positions]
        overhead = self.chunk_overhead_tokens if self.split_by_length else -1
        chunks = length_chunks(lengths, overhead)
        padded = multiplied = 0
        seconds = 0.0
        for start, stop in chunks:
            chunk = positions[start:stop]
            padded += lengths[stop - 1] * len(chunk)
            began = time.perf_counter()
            try:
                multiplied += self._forward_chunk(base, rows, chunk, adapters, results)
            except Exception:
                logger.exception("batch forward of %d rows failed; retrying them one by one", len(chunk))
                for position in chunk:
                    try:
                        multiplied += self._forward_chunk(base, rows, [position], adapters, results)
                    except Exception:
                        logger.exception("forward failed for one row of adapter %r", rows[position].adapter)
                        results[position] = InferenceError("inference failed for this input")
            seconds += time.perf_counter() - began
        per_adapter: dict[str, int] = defaultdict(int)
        for position in positions:
            per_adapter[rows[position].adapter] += 1
        return BatchStats(
            rows=len(positions),
            requests=len({rows[p].request_id for p in positions}),
            padded_tokens=padded,
            real_tokens=sum(lengths),
            adapters=dict(per_adapter),
            inference_seconds=seconds,
            adapter_rows_multiplied=multiplied,
        )

    def _forward_chunk(
        self,
        base: BaseModel,
        rows: list[PreparedRow],
        chunk: list[int],
        adapters: dict[tuple[str, int], LoadedAdapter],
        results: list,
    ) -> int:
        """One routed forward over ``chunk`` (row positions); fills ``results``; returns rows multiplied."""
        width = max(rows[p].tokens for p in chunk)
        pad_id = base.tokenizer.pad_token_id or 0
        ids = torch.tensor([[*rows[p].input_ids, *[pad_id] * (width - rows[p].tokens)] for p in chunk])
        mask = torch.tensor([[1] * rows[p].tokens + [0] * (width - rows[p].tokens) for p in chunk])
        types = None
        if all(rows[p].token_type_ids is not None for p in chunk):
            types = torch.tensor([[*rows[p].token_type_ids, *[0] * (width - rows[p].tokens)] for p in chunk])
        device = _device_of(base)
        slots = torch.tensor([rows[p].slot for p in chunk], dtype=torch.long)
        taus = torch.tensor([rows[p].tau for p in chunk], dtype=torch.float32)
        began = time.perf_counter()
        with base.lock:
            # Slots may have changed since the rows were checked: re-check under the lock.
            live = [p for p in chunk if self.repository.is_current(rows[p].adapter, rows[p].generation)]
            if len(live) != len(chunk):
                for position in set(chunk) - set(live):
                    results[position] = _unloaded(rows[position])
                if not live:
                    return 0
                keep = torch.tensor([chunk.index(p) for p in live])
                ids, mask, slots, taus = ids[keep], mask[keep], slots[keep], taus[keep]
                types = types[keep] if types is not None else None
                chunk = live
            with torch.inference_mode():
                output = base.model(
                    ids.to(device),
                    mask.to(device),
                    types.to(device) if types is not None else None,
                    slots=slots.to(device),
                    taus=taus.to(device),
                    force_gates=self.force_gates,
                )
                num_labels = torch.tensor([len(adapters[(rows[p].adapter, rows[p].generation)].labels) for p in chunk])
                logits = output.logits.float().cpu()
                columns = torch.arange(logits.shape[1])
                logits = logits.masked_fill(columns[None, :] >= num_labels[:, None], float("-inf"))
                probs = torch.softmax(logits, dim=-1).tolist()
                gates = output.gates.cpu().tolist()
        seconds = time.perf_counter() - began
        site_names = base.site_names
        for i, position in enumerate(chunk):
            row = rows[position]
            adapter = adapters[(row.adapter, row.generation)]
            results[position] = _row_result(adapter, row, probs[i], gates[i], site_names, seconds)
        return output.adapter_rows

    # ---- warm-up ------------------------------------------------------------------------------

    def warmup(self, texts: tuple[str, ...] = ("warm up", "a slightly longer sentence to warm up the engine")) -> None:
        """One forward per adapter (and one mixed batch per base), so first requests pay no set-up."""
        rows = []
        for info in self.repository.adapters():
            rows += self.prepare(ClassifyRequest(texts=list(texts), adapter=info.name))
        for row in rows:
            self.run_batch([row])
        if rows:
            self.run_batch(rows)


def _device_of(base: BaseModel) -> torch.device:
    return next(base.model.parameters()).device


def _unloaded(row: PreparedRow) -> AdapterUnloadedError:
    return AdapterUnloadedError(f"adapter {row.adapter!r} was unloaded while the request waited")


def _row_result(
    adapter: LoadedAdapter,
    row: PreparedRow,
    probs: list[float],
    gates: list[bool],
    site_names: list[str],
    seconds: float,
) -> RowResult:
    labels = adapter.labels
    scores = sorted(
        ({"label": label, "score": probs[i]} for i, label in enumerate(labels)),
        key=lambda item: item["score"],
        reverse=True,
    )
    active = [name for name, on in zip(site_names, gates, strict=True) if on]
    flops = adapter.flops.request(row.tokens, gates)
    return RowResult(
        label=scores[0]["label"],
        score=scores[0]["score"],
        scores=scores,
        active_adapters=len(active),
        total_adapters=adapter.info.total_adapters,
        active_modules=active,
        tokens=row.tokens,
        flops={"total": flops.total, "adapter": flops.adapter, "adapter_saved": flops.adapter_saved},
        inference_seconds=seconds,
    )
