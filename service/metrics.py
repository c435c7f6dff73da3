"""Prometheus metrics of one app instance (docs/service.md), on a private registry.

Per-adapter labels are what operators ask for, but a thousand adapters times every histogram bucket
is a cardinality explosion. :class:`AdapterLabels` lets the operator choose
(``COGALORA_METRICS_ADAPTER_LABELS``):

- ``all`` (default): one label value per adapter; fine up to a few hundred adapters.
- ``top:N``: the N adapters with the most traffic keep their own label, every other one is counted
  under ``adapter="other"``. The top N are re-ranked every ``rerank_s`` seconds on traffic since
  start-up; an adapter that drops out has its series removed (its history stays in Prometheus,
  new traffic goes to ``other``), so the number of series stays bounded.
- ``a,b,c``: exactly these adapters get their own label, the rest ``other``.

The dashboard's queries group by ``adapter`` and work the same in every mode.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.fidelity import DriftWindow
from service.schemas import RowResult
from service.settings import Settings
from service.types import BatchStats

UNKNOWN_ADAPTER = "unknown"
OTHER_ADAPTERS = "other"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024)
_ACTIVE_BUCKETS = (0, 1, 2, 4, 6, 8, 12, 16, 24, 36, 48, 72, 96, 144)
_RANK_BUCKETS = (0, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 288, 576)
_FLOP_BUCKETS = tuple(float(10**e * m) for e in range(6, 12) for m in (1, 2.5, 5))
_SCORE_DIFFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def split_site(site: str) -> tuple[str, str]:
    """``layer.0.attention.query`` -> (``"0"``, ``"attention.query"``); anything else -> (``""``, site)."""
    parts = site.split(".", 2)
    if len(parts) == 3 and parts[0] == "layer" and parts[1].isdigit():
        return parts[1], parts[2]
    return "", site


class AdapterLabels:
    """Maps an adapter name to the label value its series use (see the module docstring)."""

    def __init__(self, mode: str = "all", rerank_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        mode = mode.strip()
        self.mode = mode
        self.top = 0
        self.listed: frozenset[str] = frozenset()
        if mode.startswith("top:"):
            count = mode[4:].strip()
            self.top = int(count) if count.isdigit() else 0
            if self.top < 1:
                raise ValueError(f"top:N needs a whole number N >= 1 (e.g. top:20), got {mode!r}")
        elif mode != "all":
            self.listed = frozenset(name.strip() for name in mode.split(",") if name.strip())
            if not self.listed:
                raise ValueError("metrics adapter labels: use 'all', 'top:N' or a comma-separated list of adapters")
        self._traffic: Tally[str] = Tally()
        self._labelled: set[str] = set()
        self._rerank_s = rerank_s
        self._clock = clock
        self._next_rerank = clock()
        self._lock = threading.Lock()
        self.on_dropped: Callable[[str], None] = lambda name: None
        """Called with an adapter that lost its own label (the metrics remove its series)."""

    def __call__(self, adapter: str, inputs: int = 0) -> str:
        """The label for ``adapter``; ``inputs`` counts its traffic (top:N ranking)."""
        if adapter == UNKNOWN_ADAPTER:
            return adapter
        if self.listed:
            return adapter if adapter in self.listed else OTHER_ADAPTERS
        if not self.top:
            return adapter
        with self._lock:
            self._traffic[adapter] += inputs
            if adapter not in self._labelled and len(self._labelled) < self.top:
                self._labelled.add(adapter)
            if self._clock() >= self._next_rerank:
                self._rerank()
            return adapter if adapter in self._labelled else OTHER_ADAPTERS

    def _rerank(self) -> None:
        self._next_rerank = self._clock() + self._rerank_s
        leaders = {name for name, _ in self._traffic.most_common(self.top)}
        for name in self._labelled - leaders:
            self.on_dropped(name)
        self._labelled = leaders


def service_metrics(settings: Settings) -> ServiceMetrics:
    """The service's metrics, configured from its settings (one process, or a Ray Serve replica)."""
    metrics = ServiceMetrics(AdapterLabels(settings.metrics_adapter_labels), settings.drift_window)
    metrics.queue_capacity.set(settings.max_queue)
    return metrics


class ServiceMetrics:
    """Every ``cogalora_*`` metric; also the engine's BatchListener and the repository's listener."""

    def __init__(self, adapter_labels: AdapterLabels | None = None, drift_window: int = 1000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.drift = DriftWindow(drift_window) if drift_window > 0 else None
        """Per-adapter window of live gate counts behind ``cogalora_routing_drift`` (None: disabled)."""
        self.label = adapter_labels or AdapterLabels()
        self.label.on_dropped = self._drop_adapter
        self._series: dict[str, set[tuple[object, tuple[str, ...]]]] = {}
        self._series_lock = threading.Lock()
        r = self.registry
        self.requests = Counter(
            "cogalora_requests",
            "Classification requests (/classify, TEI, Open Inference) by adapter and status code.",
            ["adapter", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "cogalora_request_duration_seconds",
            "Whole classification request (any protocol), as the server saw it.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokenize_duration = Histogram(
            "cogalora_tokenize_duration_seconds",
            "Tokenizing one request's texts (one batched call, off the event loop).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "cogalora_queue_duration_seconds",
            "Time a request's rows waited for a batch (max over its rows).",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "cogalora_inference_duration_seconds",
            "Engine time of a request's batches (max over its rows).",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("cogalora_batch_size", "Rows per engine batch.", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_duration = Histogram(
            "cogalora_batch_duration_seconds", "Wall time of one engine batch.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.forwards = Counter("cogalora_forwards", "Routed forwards (one per length chunk of a batch).", registry=r)
        self.padded_tokens = Counter("cogalora_padded_tokens", "Tokens the forwards ran, padding included.", registry=r)
        self.real_tokens = Counter("cogalora_real_tokens", "Real (unpadded) tokens the forwards ran.", registry=r)
        self.adapter_rows = Counter(
            "cogalora_adapter_rows_multiplied",
            "(row, site) pairs multiplied by an adapter: the adapter work actually done.",
            registry=r,
        )
        self.input_tokens = Histogram(
            "cogalora_input_tokens", "Tokens per classified input.", ["adapter"], buckets=_TOKEN_BUCKETS, registry=r
        )
        self.inputs = Counter("cogalora_inputs", "Inputs classified.", ["adapter"], registry=r)
        self.truncated_inputs = Counter(
            "cogalora_truncated_inputs",
            "Inputs cut to the adapter's max_length before classification (truncate=true).",
            ["adapter"],
            registry=r,
        )
        self.active_adapters = Histogram(
            "cogalora_active_adapters",
            "Adapter sites that ran, per classified input.",
            ["adapter"],
            buckets=_ACTIVE_BUCKETS,
            registry=r,
        )
        self.active_rank = Histogram(
            "cogalora_active_rank",
            "Total LoRA rank used per classified input (sum over active sites; RAD-LoRA routes it).",
            ["adapter"],
            buckets=_RANK_BUCKETS,
            registry=r,
        )
        self.request_flops = Histogram(
            "cogalora_request_flops",
            "Total FLOPs per classified input.",
            ["adapter"],
            buckets=_FLOP_BUCKETS,
            registry=r,
        )
        self.adapter_flops = Counter(
            "cogalora_adapter_flops", "Adapter FLOPs executed (gates on).", ["adapter"], registry=r
        )
        self.adapter_flops_saved = Counter(
            "cogalora_adapter_flops_saved", "Adapter FLOPs skipped because gates were off.", ["adapter"], registry=r
        )
        self.module_activations = Counter(
            "cogalora_module_activations",
            "Inputs for which an adapter site ran, by layer and module kind.",
            ["adapter", "layer", "module"],
            registry=r,
        )
        self.shadow_rows = Counter(
            "cogalora_shadow_rows",
            "Shadow dense checks: routed rows re-run with every gate on, by whether the labels agreed.",
            ["adapter", "agreement"],
            registry=r,
        )
        self.shadow_score_difference = Histogram(
            "cogalora_shadow_score_difference",
            "|routed - dense| probability of the returned label, per shadow dense check.",
            ["adapter"],
            buckets=_SCORE_DIFFERENCE_BUCKETS,
            registry=r,
        )
        self.routing_drift = Gauge(
            "cogalora_routing_drift",
            "Mean absolute difference between live per-site activation rates (last drift_window rows at the "
            "adapter's tau) and the rates its checkpoint measured on dev data.",
            ["adapter"],
            registry=r,
        )
        self.queue_depth = Gauge("cogalora_queue_depth", "Rows admitted and not running yet.", registry=r)
        self.queue_capacity = Gauge(
            "cogalora_queue_capacity", "Rows that may wait (max_queue) before requests are refused.", registry=r
        )
        self.inflight = Gauge(
            "cogalora_inflight_requests", "Classification requests (any protocol) being handled.", registry=r
        )
        self.adapters_loaded = Gauge("cogalora_adapters_loaded", "Adapters in memory now.", registry=r)
        self.adapters_available = Gauge(
            "cogalora_adapters_available", "Servable adapters in the model repository (loaded or not).", registry=r
        )
        self.adapter_loads = Counter("cogalora_adapter_loads", "Adapters loaded into memory.", registry=r)
        self.adapter_evictions = Counter(
            "cogalora_adapter_evictions", "Adapters evicted from memory (least recently used).", registry=r
        )
        self.key_requests = Counter(
            "cogalora_key_requests",
            "Requests to classification and catalogue routes made with a key, by key id (never the key) and "
            "status code.",
            ["key_id", "code"],
            registry=r,
        )
        self.key_inputs = Counter("cogalora_key_inputs", "Inputs classified, by key id.", ["key_id"], registry=r)
        self.key_rate_limited = Counter(
            "cogalora_key_rate_limited",
            "Requests refused with 429 by a key's token bucket, by key id and limit (requests, rows).",
            ["key_id", "limit"],
            registry=r,
        )
        self.key_file_reloads = Counter(
            "cogalora_key_file_reloads",
            "Key file reloads (on change or SIGHUP) by outcome: ok, or invalid (the keys in force were kept).",
            ["outcome"],
            registry=r,
        )
        self.adapter_load_duration = Histogram(
            "cogalora_adapter_load_duration_seconds",
            "Reading one adapter's files and loading it onto its shared encoder.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )

    def bind(
        self,
        queue_depth: Callable[[], float],
        adapters_loaded: Callable[[], float],
        adapters_available: Callable[[], float],
    ) -> None:
        """Read the live gauges from the batcher and the repository at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.adapters_loaded.set_function(adapters_loaded)
        self.adapters_available.set_function(adapters_available)

    # ---- listeners ----------------------------------------------------------------------------

    def on_batch(self, stats: BatchStats) -> None:
        """BatchListener: one engine batch finished."""
        self.batch_size.observe(stats.rows)
        self.batch_duration.observe(stats.inference_seconds)
        self.forwards.inc(stats.forwards)
        self.padded_tokens.inc(stats.padded_tokens)
        self.real_tokens.inc(stats.real_tokens)
        self.adapter_rows.inc(stats.adapter_rows_multiplied)
        for outcome in stats.shadow:
            label = self.label(outcome.adapter)
            self._labelled(self.shadow_rows, label, "agree" if outcome.agree else "disagree").inc()
            self._labelled(self.shadow_score_difference, label).observe(outcome.score_difference)
        if self.drift is not None:
            for sample in stats.routing:
                drift = self.drift.add(sample)
                label = self.label(sample.adapter)
                # "other" mixes adapters with different references: no single drift to report.
                if drift is not None and label != OTHER_ADAPTERS:
                    self._labelled(self.routing_drift, label).set(drift)

    def on_adapter_loaded(self, name: str, seconds: float) -> None:
        self.adapter_loads.inc()
        if self.drift is not None:
            self.drift.forget(name)  # a reload may come from another checkpoint, with another reference
        self.adapter_load_duration.observe(seconds)

    def on_adapter_evicted(self, name: str) -> None:
        self.adapter_evictions.inc()

    # ---- requests -----------------------------------------------------------------------------

    def observe_request(self, adapter: str, code: int, seconds: float) -> None:
        """One classification call (any protocol) finished with ``code``."""
        label = self.label(adapter)
        self._labelled(self.requests, label, str(code)).inc()
        self._labelled(self.request_duration, label).observe(seconds)

    def observe_results(self, adapter: str, results: Iterable[RowResult]) -> tuple[float, float]:
        """Record every classified input; returns the request's (queue, inference) seconds, max over rows."""
        results = list(results)
        label = self.label(adapter, len(results))
        queue = inference = tokenize = 0.0
        inputs = self._labelled(self.inputs, label)
        truncated = self._labelled(self.truncated_inputs, label)  # the series exists (at 0) from the first input
        tokens = self._labelled(self.input_tokens, label)
        active = self._labelled(self.active_adapters, label)
        rank = self._labelled(self.active_rank, label)
        flops = self._labelled(self.request_flops, label)
        adapter_flops = self._labelled(self.adapter_flops, label)
        saved = self._labelled(self.adapter_flops_saved, label)
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
                self._labelled(self.module_activations, label, *split_site(site)).inc()
        self._labelled(self.queue_duration, label).observe(queue)
        self._labelled(self.inference_duration, label).observe(inference)
        self.tokenize_duration.observe(tokenize)
        return queue, inference

    def _labelled(self, metric, label: str, *rest: str):
        """``metric.labels(label, *rest)``, remembering the series so a dropped adapter can be removed."""
        if self.label.top and label not in (OTHER_ADAPTERS, UNKNOWN_ADAPTER):
            with self._series_lock:
                self._series.setdefault(label, set()).add((metric, (label, *rest)))
        return metric.labels(label, *rest)

    def _drop_adapter(self, name: str) -> None:
        with self._series_lock:
            series = self._series.pop(name, set())
        for metric, labels in series:
            metric.remove(*labels)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
