"""The one classification path every protocol shares: ``/classify``, the TEI routes and Open Inference v2.

A route translates its wire format into texts plus options, calls :func:`classify_texts`, and
translates the :class:`Classified` answer back. Size limits, adapter resolution within the key's
scope, the key's row rate, batching and the per-input metrics (:func:`record_answers`) happen here,
once, whichever protocol the client speaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from cogalora.architectures import parse_site_name
from service.auth import access_of, principal_of, scoped
from service.errors import UnknownAdapterError
from service.lifecycle import Service
from service.metrics import ServiceMetrics
from service.schemas import RowResult, check_texts
from service.types import ClassifyRequest


def service_of(request: Request) -> Service:
    """The :class:`Service` the app was built around."""
    return request.app.state.service


@dataclass(frozen=True)
class Classified:
    """The answer of one classification request, whatever protocol carried it."""

    adapter: str
    results: list[RowResult]
    queue_seconds: float
    inference_seconds: float

    def timing_headers(self) -> dict[str, str]:
        return {
            "X-Queue-Time-Ms": f"{self.queue_seconds * 1000:.3f}",
            "X-Inference-Time-Ms": f"{self.inference_seconds * 1000:.3f}",
        }


async def classify_texts(
    request: Request,
    texts: list[str],
    adapter: str | None,
    *,
    threshold: float | None = None,
    truncate: bool = True,
    raw_scores: bool = False,
) -> Classified:
    """Validate, resolve the adapter, batch, run and record one request; raises ServiceError (4xx/5xx)."""
    service = service_of(request)
    info = request.scope["state"]["cogalora"]
    info["inputs"] = len(texts)
    settings = service.settings
    check_texts(texts, settings.max_client_batch, settings.max_input_chars)
    repository, batcher = service.require_ready()
    principal = principal_of(request)
    visible = scoped(request, repository)
    name = visible.resolve(adapter)
    info["adapter"] = name
    access_of(request).admit_rows(principal, len(texts))
    job = ClassifyRequest(texts=texts, adapter=name, threshold=threshold, truncate=truncate, client=principal.key_id)
    try:
        results = await batcher.submit(job)
    except UnknownAdapterError:  # removed since it was resolved: answered within the key's scope too
        raise visible.unknown(name) from None
    queue_s, inference_s = record_answers(service.metrics, name, results)
    if principal.keyed:
        service.metrics.key_inputs.labels(principal.key_id).inc(len(results))
    if not raw_scores:
        for row in results:
            row.raw_scores = None
    return Classified(adapter=name, results=results, queue_seconds=queue_s, inference_seconds=inference_s)


def record_answers(metrics: ServiceMetrics, adapter: str, results: list[RowResult]) -> tuple[float, float]:
    """Record every classified input of one request; returns its (queue, inference) seconds, max over rows."""
    label = metrics.label(adapter, len(results))
    queue = inference = tokenize = 0.0
    inputs = metrics.labelled(metrics.inputs, label)
    truncated = metrics.labelled(metrics.truncated_inputs, label)  # the series exists (at 0) from the first input
    tokens = metrics.labelled(metrics.input_tokens, label)
    active = metrics.labelled(metrics.active_adapters, label)
    rank = metrics.labelled(metrics.active_rank, label)
    flops = metrics.labelled(metrics.request_flops, label)
    adapter_flops = metrics.labelled(metrics.adapter_flops, label)
    saved = metrics.labelled(metrics.adapter_flops_saved, label)
    for row in results:
        queue = max(queue, row.queue_seconds)
        inference = max(inference, row.inference_seconds)
        tokenize = max(tokenize, row.tokenize_seconds)
        inputs.inc()
        if row.truncated:
            truncated.inc()
        tokens.observe(row.tokens)
        active.observe(row.active_adapters)
        rank.observe(row.active_rank)
        flops.observe(row.flops.total)
        adapter_flops.inc(max(0.0, row.flops.adapter))
        saved.inc(max(0.0, row.flops.adapter_saved))
        for site in row.active_modules:
            layer, kind = parse_site_name(site)
            metrics.labelled(metrics.module_activations, label, str(layer), kind).inc()
    metrics.labelled(metrics.queue_duration, label).observe(queue)
    metrics.labelled(metrics.inference_duration, label).observe(inference)
    metrics.tokenize_duration.observe(tokenize)
    return queue, inference
