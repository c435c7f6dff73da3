"""From the engine's numbers to the answer a client reads: label names, sorted scores, site names.

The engine returns :class:`~service.types.RowOutput` (probabilities, logits, active site indices);
the HTTP layer names them here, with what the catalogue says of the adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.errors import ServiceError
from service.schemas import Flops, LabelScore, RowResult
from service.types import RowOutput

if TYPE_CHECKING:
    from service.engine import PreparedRow


def row_result(output: RowOutput, labels: list[str], site_names: list[str], total_adapters: int) -> RowResult:
    """The wire answer for one input: labels by score, the sites that ran by name (``site_names``: the
    encoder's site order, which ``active_sites`` index)."""
    probabilities = output.probabilities
    order = sorted(range(len(labels)), key=lambda i: probabilities[i], reverse=True)
    scores = [LabelScore.model_construct(label=labels[i], score=probabilities[i]) for i in order]
    # Always built (a few floats); the HTTP layer drops them unless the client asked for raw scores.
    raw_scores = [LabelScore.model_construct(label=labels[i], score=output.logits[i]) for i in order]
    total, adapter, saved = output.flops
    return RowResult.model_construct(
        label=scores[0].label,
        score=scores[0].score,
        scores=scores,
        active_adapters=len(output.active_sites),
        total_adapters=total_adapters,
        active_modules=[site_names[index] for index in output.active_sites],
        active_rank=sum(output.active_ranks),
        active_ranks=list(output.active_ranks),
        tokens=output.tokens,
        input_tokens=output.input_tokens,
        truncated=output.input_tokens > output.tokens,
        flops=Flops.model_construct(total=total, adapter=adapter, adapter_saved=saved),
        raw_scores=raw_scores,
        queue_seconds=output.queue_seconds,
        inference_seconds=output.inference_seconds,
    )


def describe(row: PreparedRow, output: RowOutput | ServiceError) -> RowResult | ServiceError:
    """The wire answer of one engine row, named from its loaded adapter (offline tools, benchmarks)."""
    if not isinstance(output, RowOutput):
        return output
    adapter = row.adapter
    return row_result(output, adapter.labels, adapter.encoder.site_names, adapter.total_adapters)
