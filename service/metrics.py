"""Prometheus metrics of one app instance (docs/service.md), on a private registry (defined in
``service.metric_definitions``).

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
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service import metric_definitions as defined
from service.fidelity import DriftWindow
from service.metric_definitions import Metric
from service.settings import Settings
from service.types import BatchStats

UNKNOWN_ADAPTER = "unknown"
OTHER_ADAPTERS = "other"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_COLLECTORS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


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

    def __init__(self, adapter_labels: AdapterLabels | None = None, drift_window: int | None = None) -> None:
        """``drift_window`` (default: the setting's default): rows per adapter behind the drift gauge; 0 disables it."""
        if drift_window is None:
            drift_window = Settings.model_fields["drift_window"].default
        self.registry = CollectorRegistry(auto_describe=True)
        self.drift = DriftWindow(drift_window) if drift_window > 0 else None
        """Per-adapter window of live gate counts behind ``cogalora_routing_drift`` (None: disabled)."""
        self.label = adapter_labels or AdapterLabels()
        self.label.on_dropped = self._drop_adapter
        self._series: dict[str, set[tuple[object, tuple[str, ...]]]] = {}
        self._series_lock = threading.Lock()
        self.requests = self._collector(defined.REQUESTS)
        self.request_duration = self._collector(defined.REQUEST_DURATION)
        self.tokenize_duration = self._collector(defined.TOKENIZE_DURATION)
        self.queue_duration = self._collector(defined.QUEUE_DURATION)
        self.inference_duration = self._collector(defined.INFERENCE_DURATION)
        self.inflight = self._collector(defined.INFLIGHT)
        self.batch_size = self._collector(defined.BATCH_SIZE)
        self.batch_duration = self._collector(defined.BATCH_DURATION)
        self.forwards = self._collector(defined.FORWARDS)
        self.padded_tokens = self._collector(defined.PADDED_TOKENS)
        self.real_tokens = self._collector(defined.REAL_TOKENS)
        self.adapter_rows = self._collector(defined.ADAPTER_ROWS)
        self.queue_depth = self._collector(defined.QUEUE_DEPTH)
        self.queue_capacity = self._collector(defined.QUEUE_CAPACITY)
        self.inputs = self._collector(defined.INPUTS)
        self.input_tokens = self._collector(defined.INPUT_TOKENS)
        self.truncated_inputs = self._collector(defined.TRUNCATED_INPUTS)
        self.active_adapters = self._collector(defined.ACTIVE_ADAPTERS)
        self.active_rank = self._collector(defined.ACTIVE_RANK)
        self.request_flops = self._collector(defined.REQUEST_FLOPS)
        self.adapter_flops = self._collector(defined.ADAPTER_FLOPS)
        self.adapter_flops_saved = self._collector(defined.ADAPTER_FLOPS_SAVED)
        self.module_activations = self._collector(defined.MODULE_ACTIVATIONS)
        self.shadow_rows = self._collector(defined.SHADOW_ROWS)
        self.shadow_score_difference = self._collector(defined.SHADOW_SCORE_DIFFERENCE)
        self.routing_drift = self._collector(defined.ROUTING_DRIFT)
        self.adapters_loaded = self._collector(defined.ADAPTERS_LOADED)
        self.adapters_available = self._collector(defined.ADAPTERS_AVAILABLE)
        self.adapter_loads = self._collector(defined.ADAPTER_LOADS)
        self.adapter_evictions = self._collector(defined.ADAPTER_EVICTIONS)
        self.adapter_load_duration = self._collector(defined.ADAPTER_LOAD_DURATION)
        self.key_requests = self._collector(defined.KEY_REQUESTS)
        self.key_inputs = self._collector(defined.KEY_INPUTS)
        self.key_rate_limited = self._collector(defined.KEY_RATE_LIMITED)
        self.key_file_reloads = self._collector(defined.KEY_FILE_RELOADS)

    def _collector(self, metric: Metric):
        """The Prometheus collector of ``metric``, in this instance's registry."""
        options = {"buckets": metric.buckets} if metric.kind == "histogram" else {}
        return _COLLECTORS[metric.kind](
            metric.name, metric.help, list(metric.labels), registry=self.registry, **options
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
            self.labelled(self.shadow_rows, label, "agree" if outcome.agree else "disagree").inc()
            self.labelled(self.shadow_score_difference, label).observe(outcome.score_difference)
        if self.drift is not None:
            for sample in stats.routing:
                drift = self.drift.add(sample)
                label = self.label(sample.adapter)
                # "other" mixes adapters with different references: no single drift to report.
                if drift is not None and label != OTHER_ADAPTERS:
                    self.labelled(self.routing_drift, label).set(drift)

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
        self.labelled(self.requests, label, str(code)).inc()
        self.labelled(self.request_duration, label).observe(seconds)

    def labelled(self, metric, label: str, *rest: str):
        """``metric.labels(label, *rest)`` of a per-adapter metric (``label``: the adapter's label value, from
        :attr:`label`), remembering the series so that an adapter that loses its own label can be removed."""
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
