"""Prometheus metrics of one app instance (DESIGN.md §7), on a private registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.types import BatchStats, RowResult

UNKNOWN_ADAPTER = "unknown"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024)
_ACTIVE_BUCKETS = (0, 1, 2, 4, 6, 8, 12, 16, 24, 36, 48, 72, 96, 144)
_FLOP_BUCKETS = tuple(float(10**e * m) for e in range(6, 12) for m in (1, 2.5, 5))


def split_site(site: str) -> tuple[str, str]:
    """``layer.0.attention.query`` -> (``"0"``, ``"attention.query"``); anything else -> (``""``, site)."""
    parts = site.split(".", 2)
    if len(parts) == 3 and parts[0] == "layer" and parts[1].isdigit():
        return parts[1], parts[2]
    return "", site


class ServiceMetrics:
    """Every ``cogalora_*`` metric; also the engine's :class:`~service.types.BatchListener`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cogalora_requests", "POST /classify requests by adapter and status code.", ["adapter", "code"], registry=r
        )
        self.request_duration = Histogram(
            "cogalora_request_duration_seconds",
            "Whole POST /classify request, as the server saw it.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
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
        self.batch_size = Histogram(
            "cogalora_batch_size", "Rows per engine forward.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_duration = Histogram(
            "cogalora_batch_duration_seconds", "Wall time of one engine forward.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.input_tokens = Histogram(
            "cogalora_input_tokens", "Tokens per classified input.", ["adapter"], buckets=_TOKEN_BUCKETS, registry=r
        )
        self.inputs = Counter("cogalora_inputs", "Inputs classified.", ["adapter"], registry=r)
        self.active_adapters = Histogram(
            "cogalora_active_adapters",
            "Adapter modules that ran, per classified input.",
            ["adapter"],
            buckets=_ACTIVE_BUCKETS,
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
            "Inputs for which an adapter module ran, by layer and module kind.",
            ["adapter", "layer", "module"],
            registry=r,
        )
        self.queue_depth = Gauge("cogalora_queue_depth", "Rows waiting for a batch.", registry=r)
        self.inflight = Gauge("cogalora_inflight_requests", "POST /classify requests being handled.", registry=r)
        self.adapters_loaded = Gauge("cogalora_adapters_loaded", "Adapters loaded and servable.", registry=r)

    def bind(self, queue_depth: Callable[[], float], adapters_loaded: Callable[[], float]) -> None:
        """Read the two live gauges from the batcher and the repository at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.adapters_loaded.set_function(adapters_loaded)

    def on_batch(self, stats: BatchStats) -> None:
        """BatchListener: one engine forward finished."""
        self.batch_size.observe(stats.rows)
        self.batch_duration.observe(stats.inference_seconds)

    def observe_request(self, adapter: str, code: int, seconds: float) -> None:
        """One POST /classify call finished with ``code``."""
        self.requests.labels(adapter, str(code)).inc()
        self.request_duration.labels(adapter).observe(seconds)

    def observe_results(self, adapter: str, results: Iterable[RowResult]) -> tuple[float, float]:
        """Record every classified input; returns the request's (queue, inference) seconds, max over rows."""
        queue = inference = 0.0
        for row in results:
            queue = max(queue, row.queue_seconds)
            inference = max(inference, row.inference_seconds)
            self.inputs.labels(adapter).inc()
            self.input_tokens.labels(adapter).observe(row.tokens)
            self.active_adapters.labels(adapter).observe(row.active_adapters)
            self.request_flops.labels(adapter).observe(float(row.flops.get("total", 0.0)))
            self.adapter_flops.labels(adapter).inc(max(0.0, float(row.flops.get("adapter", 0.0))))
            self.adapter_flops_saved.labels(adapter).inc(max(0.0, float(row.flops.get("adapter_saved", 0.0))))
            for site in row.active_modules:
                layer, module = split_site(site)
                self.module_activations.labels(adapter, layer, module).inc()
        self.queue_duration.labels(adapter).observe(queue)
        self.inference_duration.labels(adapter).observe(inference)
        return queue, inference

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
