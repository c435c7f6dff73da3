"""The execution engine: tokenization, routed forwards over mixed-adapter batches, per-row results.

:meth:`Engine.tokenize` turns the texts of one request into :class:`PreparedRow` objects bound to
one pinned adapter. :meth:`Engine.run_batch` takes rows of any adapters and thresholds, groups them
by shared encoder, sorts them by length and cuts the sorted rows into a few length chunks where that
saves more padded tokens than a forward costs (``service.engine_tuning``); every chunk is one routed
forward that mixes adapters and thresholds freely. Results are built from the forward's logits and
gates: labels, sorted scores, active modules, the total rank they used and the analytic FLOPs of
each row on its own length (at the rank each site used: RAD-LoRA rows may use less than the adapter's).

Routing fidelity (``service.fidelity``): a sampled row also runs as an extra *shadow* row of the same
batch with tau 0 (every gate on: plain LoRA, same weights), in a forward after the served rows'; the
caller gets the routed row's answer, the batch stats carry the comparison. Rows served at their
adapter's own tau also report their gate counts at the adapter's reference sites, for the
routing-drift gauge.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch

from service.encoders import SharedEncoder
from service.engine_tuning import chunk_overhead_for, length_chunks, release_free_memory, tune_allocator
from service.errors import AdapterUnloadedError, InferenceError, ServiceError
from service.fidelity import ShadowSampler, compare
from service.repository import LoadedAdapter, ModelRepository
from service.tokenization import tokenize_texts
from service.types import BatchStats, ClassifyRequest, RoutingSample, RowOutput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRow:
    """One tokenized input, bound to one load of one adapter."""

    adapter: LoadedAdapter
    input_ids: list[int]
    tau: float
    input_tokens: int
    """Tokens before truncation (equal to ``tokens`` unless the input was cut)."""

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class EngineRun:
    """What :meth:`Engine.run_batch` returns: per-row results (in input order) and per-encoder stats."""

    results: list[RowOutput | ServiceError]
    stats: list[BatchStats]


class Engine:
    """Runs mixed-adapter batches on the repository's shared encoders."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        split_by_length: bool = True,
        chunk_overhead_tokens: int | None = None,
        tune_malloc: bool = True,
        force_gates: Literal["on", "off"] | None = None,
        always_gather: bool = False,
        shadow_fraction: float = 0.0,
        shadow_seed: int = 0,
    ) -> None:
        self.repository = repository
        self.always_gather = always_gather
        """Use the mixed-batch (gathered) adapter path even for one-adapter batches (tests, benchmarks)."""
        self.split_by_length = split_by_length
        if chunk_overhead_tokens is None:
            chunk_overhead_tokens = chunk_overhead_for(repository.precision)
        self.chunk_overhead_tokens = chunk_overhead_tokens
        self.force_gates = force_gates
        """Diagnostics and benchmarks only: every present adapter on ("on") or none ("off")."""
        self.shadow = ShadowSampler(shadow_fraction, shadow_seed)
        """Picks the rows that also run densely (tau 0) as shadow rows; see ``service.fidelity``."""
        if tune_malloc and repository.device.type == "cpu":
            tune_allocator()

    @property
    def lanes(self) -> int:
        """Forwards that can run at once (``ModelRepository(lanes=...)``)."""
        return self.repository.lanes

    # ---- preparation --------------------------------------------------------------------------

    def tokenize(
        self, adapter: LoadedAdapter, texts: list[str], truncate: bool = True, tau: float | None = None
    ) -> list[PreparedRow]:
        """Tokenize the texts of one request in one call; raises ``InputTooLongError`` (truncate=False)."""
        encoder = adapter.encoder
        ids, input_tokens = tokenize_texts(
            encoder.tokenizer, encoder.tokenizer_lock, texts, adapter.max_length, truncate, adapter.name
        )
        return self.prepare(adapter, ids, input_tokens, tau)

    @staticmethod
    def prepare(adapter: LoadedAdapter, ids: list[list[int]], input_tokens: list[int], tau: float | None) -> list:
        """Rows of tokenized inputs for a pinned adapter (``tau`` None: the adapter's own)."""
        tau = adapter.meta.tau if tau is None else float(tau)
        return [
            PreparedRow(adapter=adapter, input_ids=row, tau=tau, input_tokens=count)
            for row, count in zip(ids, input_tokens, strict=True)
        ]

    def classify(self, request: ClassifyRequest) -> list[RowOutput]:
        """One request, synchronously (tests, benchmarks, warm-up): pin, tokenize, run, unpin."""
        adapter = self.repository.acquire(request.adapter)
        try:
            rows = self.tokenize(adapter, list(request.texts), request.truncate, request.threshold)
            results = self.run_batch(rows).results
        finally:
            self.repository.release(adapter)
        for result in results:
            if isinstance(result, ServiceError):
                raise result
        return results  # type: ignore[return-value]

    # ---- execution ----------------------------------------------------------------------------

    def run_batch(self, rows: list[PreparedRow]) -> EngineRun:
        """Results in the order of ``rows``; a failing row gets its own error, never its batch-mates'.

        Shadow rows (dense copies of sampled rows) are appended after ``rows`` and run in forwards of
        their own, after the served rows'; their results only feed ``BatchStats.shadow``.
        """
        shadow_of = {len(rows) + k: position for k, position in enumerate(self._pick_shadows(rows))}
        rows = rows + [replace(rows[position], tau=0.0) for position in shadow_of.values()]
        results: list[RowOutput | ServiceError | None] = [None] * len(rows)
        groups: dict[int, tuple[SharedEncoder, list[int]]] = {}
        for position, row in enumerate(rows):
            if not self.repository.is_current(row.adapter):
                results[position] = _unloaded(row)
                continue
            encoder = row.adapter.encoder
            groups.setdefault(id(encoder), (encoder, []))[1].append(position)
        stats = [
            self._run_encoder(encoder, rows, positions, results, shadow_of) for encoder, positions in groups.values()
        ]
        served = len(rows) - len(shadow_of)
        return EngineRun(results=results[:served], stats=stats)  # type: ignore[arg-type]

    def _pick_shadows(self, rows: list[PreparedRow]) -> list[int]:
        """Positions of the rows to check densely: sampled among rows whose gates can be off at all."""
        if self.shadow.fraction <= 0.0 or self.force_gates is not None:
            return []
        return [p for p, row in enumerate(rows) if row.adapter.routed and row.tau > 0.0 and self.shadow.pick()]

    def _run_encoder(
        self,
        encoder: SharedEncoder,
        rows: list[PreparedRow],
        positions: list[int],
        results: list,
        shadow_of: dict[int, int],
    ) -> BatchStats:
        served = sorted((p for p in positions if p not in shadow_of), key=lambda p: rows[p].tokens)
        shadow = sorted((p for p in positions if p in shadow_of), key=lambda p: rows[p].tokens)
        # An encoder that packs its tokens runs no padding: one forward for the whole batch is cheapest.
        packs = encoder.model.packs_tokens
        overhead = self.chunk_overhead_tokens if self.split_by_length and not packs else -1
        padded = multiplied = forwards = 0
        seconds = 0.0
        routing: list[RoutingSample] = []
        # Shadow rows get forwards of their own, after the served rows: the served rows' forwards are
        # then exactly those of a batch without shadows, so no answer moves even by a rounding error.
        for group in (served, shadow):
            lengths = [rows[p].tokens for p in group]
            for start, stop in length_chunks(lengths, overhead):
                chunk = group[start:stop]
                padded += sum(lengths[start:stop]) if packs else lengths[stop - 1] * len(chunk)
                forwards += 1
                began = time.perf_counter()
                try:
                    multiplied += self._forward_chunk(encoder, rows, chunk, results, routing)
                except Exception:
                    logger.exception("batch forward of %d rows failed; retrying them one by one", len(chunk))
                    for position in chunk:
                        try:
                            multiplied += self._forward_chunk(encoder, rows, [position], results, routing)
                        except Exception:
                            logger.exception("forward failed for one row of adapter %r", rows[position].adapter.name)
                            results[position] = InferenceError("inference failed for this input")
                seconds += time.perf_counter() - began
        shadows = [(shadow_of[p], p) for p in shadow]
        outcomes = tuple(
            compare(rows[served].adapter.name, results[served], results[dense])
            for served, dense in shadows
            if isinstance(results[served], RowOutput) and isinstance(results[dense], RowOutput)
        )
        return BatchStats(
            rows=len(served),
            forwards=forwards,
            padded_tokens=padded,
            real_tokens=sum(rows[p].tokens for p in positions),
            inference_seconds=seconds,
            adapter_rows_multiplied=multiplied,
            shadow=outcomes,
            routing=tuple(routing),
        )

    def _forward_chunk(
        self,
        encoder: SharedEncoder,
        rows: list[PreparedRow],
        chunk: list[int],
        results: list,
        routing: list[RoutingSample],
    ) -> int:
        """One routed forward over ``chunk`` (row positions); fills ``results``, appends the chunk's
        gate counts to ``routing``; returns rows multiplied."""
        began = time.perf_counter()
        with encoder.lanes.one() as model:
            # An admin may have unloaded an adapter since run_batch looked: check again (no slot changes
            # while a lane runs a forward).
            live = []
            for position in chunk:
                if self.repository.is_current(rows[position].adapter):
                    live.append(position)
                else:
                    results[position] = _unloaded(rows[position])
            if not live:
                return 0
            ids, mask = _padded([rows[p].input_ids for p in live], encoder.tokenizer.pad_token_id or 0)
            device = encoder.device
            with torch.inference_mode():
                output = model(
                    ids.to(device),
                    mask.to(device),
                    slots=[rows[p].adapter.slot for p in live],
                    taus=[rows[p].tau for p in live],
                    force_gates=self.force_gates,
                    gather=self.always_gather,
                    lengths=[rows[p].tokens for p in live],
                )
                logits = output.logits.float().cpu()
                gate_matrix = output.gates.cpu()
                ranks = output.ranks.cpu().tolist()
        gates = gate_matrix.tolist()
        num_labels = torch.tensor([len(rows[p].adapter.labels) for p in live])
        columns = torch.arange(logits.shape[1])
        probs = torch.softmax(logits.masked_fill(columns[None, :] >= num_labels[:, None], float("-inf")), -1).tolist()
        raw = logits.tolist()
        seconds = time.perf_counter() - began
        routers = self.force_gates is None
        for i, position in enumerate(live):
            results[position] = _row_output(rows[position], probs[i], raw[i], gates[i], ranks[i], seconds, routers)
        if routers:
            routing += _routing_samples([rows[p] for p in live], gate_matrix)
        return output.adapter_rows

    # ---- memory -------------------------------------------------------------------------------

    @staticmethod
    def release_memory() -> None:
        """Give the process's free memory back to the OS (``release_free_memory``): after loading, and
        when no batch has run for a while; the next forward faults in what it needs again."""
        release_free_memory()

    # ---- warm-up ------------------------------------------------------------------------------

    def warmup(self, texts: tuple[str, ...] = ("warm up", "a slightly longer sentence to warm up the engine")) -> None:
        """A forward per loaded adapter and a mixed batch per encoder, so first requests pay no set-up."""
        rows = []
        for name in self.repository.loaded_names():
            adapter = self.repository.acquire(name)
            try:
                rows += self.tokenize(adapter, list(texts))
            finally:
                self.repository.release(adapter)
        for row in rows:
            self.run_batch([row])
        if rows:
            self.run_batch(rows)


def _padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[n, width]`` ids and the attention mask, built in two tensor calls."""
    lengths = torch.tensor([len(ids) for ids in sequences])
    width = int(lengths.max())
    ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in sequences])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return ids, mask


def _routing_samples(rows: list[PreparedRow], gates: torch.Tensor) -> list[RoutingSample]:
    """Per adapter with a drift reference: gate counts of its rows served at its own tau.

    Rows at another tau (a request's threshold override, shadow rows at tau 0) route differently by
    design and would read as drift, so they are left out.
    """
    members: dict[int, tuple[LoadedAdapter, list[int]]] = {}
    for index, row in enumerate(rows):
        adapter = row.adapter
        if adapter.drift_sites and row.tau == adapter.meta.tau:
            members.setdefault(id(adapter), (adapter, []))[1].append(index)
    samples = []
    for adapter, indices in members.values():
        counts = gates[indices][:, list(adapter.drift_sites)].sum(dim=0).tolist()
        samples.append(
            RoutingSample(adapter.name, len(indices), tuple(int(c) for c in counts), adapter.drift_reference)
        )
    return samples


def _unloaded(row: PreparedRow) -> AdapterUnloadedError:
    return AdapterUnloadedError(f"adapter {row.adapter.name!r} was unloaded while the request waited")


def _row_output(
    row: PreparedRow,
    probs: list[float],
    logits: list[float],
    gates: list[bool],
    ranks: list[int],
    seconds: float,
    routers: bool,
) -> RowOutput:
    adapter = row.adapter
    labels = len(adapter.labels)
    active = [site for site, on in enumerate(gates) if on]
    flops = adapter.flops.request(row.tokens, gates, routers=routers, ranks=ranks)
    return RowOutput(
        probabilities=probs[:labels],
        logits=logits[:labels],
        active_sites=active,
        active_ranks=[ranks[site] for site in active],
        flops=(flops.total, flops.adapter, flops.adapter_saved),
        tokens=row.tokens,
        input_tokens=row.input_tokens,
        inference_seconds=seconds,
    )
