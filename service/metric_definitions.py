"""Every metric the service exports, defined once: name, type, labels, help text and buckets.

:mod:`service.metrics` builds its collectors from these definitions, the Grafana dashboard's generator
(``docker/grafana/make_dashboard.py``) writes its queries with their series names, and the tests hold
the docs' metrics table and the alert rules to them. Nothing here imports Prometheus or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (8, 16, 32, 64, 128, 256, 512, 1024)
_ACTIVE = (0, 1, 2, 4, 6, 8, 12, 16, 24, 36, 48, 72, 96, 144)
_RANK = (0, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 288, 576)
_FLOPS = tuple(float(10**e * m) for e in range(6, 12) for m in (1, 2.5, 5))
_SCORE_DIFFERENCE = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Metric:
    """One exported metric family."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    """Histogram bucket bounds (``+Inf`` is added)."""

    @property
    def series(self) -> str:
        """The series a query reads: ``<name>_total`` for a counter, the name itself for a gauge."""
        if self.kind == "histogram":
            raise ValueError(f"{self.name} is a histogram: query its .bucket, .sum or .count")
        return f"{self.name}_total" if self.kind == "counter" else self.name

    @property
    def bucket(self) -> str:
        return self._histogram_series("bucket")

    @property
    def sum(self) -> str:
        return self._histogram_series("sum")

    @property
    def count(self) -> str:
        return self._histogram_series("count")

    def _histogram_series(self, suffix: str) -> str:
        if self.kind != "histogram":
            raise ValueError(f"{self.name} is a {self.kind}, not a histogram")
        return f"{self.name}_{suffix}"

    @property
    def exposed(self) -> tuple[str, ...]:
        """Every series name the text exposition carries for it (``_created`` series included)."""
        if self.kind == "counter":
            return (f"{self.name}_total", f"{self.name}_created")
        if self.kind == "histogram":
            return tuple(f"{self.name}_{suffix}" for suffix in ("bucket", "sum", "count", "created"))
        return (self.name,)

    @property
    def documented_name(self) -> str:
        """How the docs' metrics table names it: a counter by its ``_total`` series."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


# ---- requests -------------------------------------------------------------------------------------

REQUESTS = Metric(
    "cogalora_requests",
    "counter",
    "Classification requests (/classify, TEI, Open Inference) by adapter and status code.",
    ("adapter", "code"),
)
REQUEST_DURATION = Metric(
    "cogalora_request_duration_seconds",
    "histogram",
    "Whole classification request (any protocol), as the server saw it.",
    ("adapter",),
    _LATENCY,
)
TOKENIZE_DURATION = Metric(
    "cogalora_tokenize_duration_seconds",
    "histogram",
    "Tokenizing one request's texts (one batched call; a long request off the event loop).",
    buckets=_FAST,
)
QUEUE_DURATION = Metric(
    "cogalora_queue_duration_seconds",
    "histogram",
    "Time a request's rows waited for a batch (max over its rows).",
    ("adapter",),
    _LATENCY,
)
INFERENCE_DURATION = Metric(
    "cogalora_inference_duration_seconds",
    "histogram",
    "Engine time of a request's batches (max over its rows).",
    ("adapter",),
    _LATENCY,
)
INFLIGHT = Metric("cogalora_inflight_requests", "gauge", "Classification requests (any protocol) being handled.")

# ---- the engine ------------------------------------------------------------------------------------

BATCH_SIZE = Metric("cogalora_batch_size", "histogram", "Rows per engine batch.", buckets=_BATCH)
BATCH_DURATION = Metric(
    "cogalora_batch_duration_seconds", "histogram", "Wall time of one engine batch.", buckets=_LATENCY
)
FORWARDS = Metric("cogalora_forwards", "counter", "Routed forwards (one per length chunk of a batch).")
PADDED_TOKENS = Metric("cogalora_padded_tokens", "counter", "Tokens the forwards ran, padding included.")
REAL_TOKENS = Metric("cogalora_real_tokens", "counter", "Real (unpadded) tokens the forwards ran.")
ADAPTER_ROWS = Metric(
    "cogalora_adapter_rows_multiplied",
    "counter",
    "(row, site) pairs multiplied by an adapter: the adapter work actually done.",
)
QUEUE_DEPTH = Metric("cogalora_queue_depth", "gauge", "Rows admitted and not running yet.")
QUEUE_CAPACITY = Metric(
    "cogalora_queue_capacity", "gauge", "Rows that may wait (max_queue) before requests are refused."
)

# ---- classified inputs -----------------------------------------------------------------------------

INPUTS = Metric("cogalora_inputs", "counter", "Inputs classified.", ("adapter",))
INPUT_TOKENS = Metric("cogalora_input_tokens", "histogram", "Tokens per classified input.", ("adapter",), _TOKENS)
TRUNCATED_INPUTS = Metric(
    "cogalora_truncated_inputs",
    "counter",
    "Inputs cut to the adapter's max_length before classification (truncate=true).",
    ("adapter",),
)
ACTIVE_ADAPTERS = Metric(
    "cogalora_active_adapters", "histogram", "Adapter sites that ran, per classified input.", ("adapter",), _ACTIVE
)
ACTIVE_RANK = Metric(
    "cogalora_active_rank",
    "histogram",
    "Total LoRA rank used per classified input (sum over active sites; RAD-LoRA routes it).",
    ("adapter",),
    _RANK,
)
REQUEST_FLOPS = Metric("cogalora_request_flops", "histogram", "Total FLOPs per classified input.", ("adapter",), _FLOPS)
ADAPTER_FLOPS = Metric("cogalora_adapter_flops", "counter", "Adapter FLOPs executed (gates on).", ("adapter",))
ADAPTER_FLOPS_SAVED = Metric(
    "cogalora_adapter_flops_saved", "counter", "Adapter FLOPs skipped because gates were off.", ("adapter",)
)
MODULE_ACTIVATIONS = Metric(
    "cogalora_module_activations",
    "counter",
    "Inputs for which an adapter site ran, by layer and module kind.",
    ("adapter", "layer", "module"),
)

# ---- routing fidelity ------------------------------------------------------------------------------

SHADOW_ROWS = Metric(
    "cogalora_shadow_rows",
    "counter",
    "Shadow dense checks: routed rows re-run with every gate on, by whether the labels agreed.",
    ("adapter", "agreement"),
)
SHADOW_SCORE_DIFFERENCE = Metric(
    "cogalora_shadow_score_difference",
    "histogram",
    "|routed - dense| probability of the returned label, per shadow dense check.",
    ("adapter",),
    _SCORE_DIFFERENCE,
)
ROUTING_DRIFT = Metric(
    "cogalora_routing_drift",
    "gauge",
    "Mean absolute difference between live per-site activation rates (last drift_window rows at the "
    "adapter's tau) and the rates its checkpoint measured on dev data.",
    ("adapter",),
)

# ---- adapters in memory ----------------------------------------------------------------------------

ADAPTERS_LOADED = Metric("cogalora_adapters_loaded", "gauge", "Adapters in memory now.")
ADAPTERS_AVAILABLE = Metric(
    "cogalora_adapters_available", "gauge", "Servable adapters in the model repository (loaded or not)."
)
ADAPTER_LOADS = Metric("cogalora_adapter_loads", "counter", "Adapters loaded into memory.")
ADAPTER_EVICTIONS = Metric(
    "cogalora_adapter_evictions", "counter", "Adapters evicted from memory (least recently used)."
)
ADAPTER_LOAD_DURATION = Metric(
    "cogalora_adapter_load_duration_seconds",
    "histogram",
    "Reading one adapter's files and loading it onto its shared encoder.",
    buckets=_FAST,
)

# ---- keys ------------------------------------------------------------------------------------------

KEY_REQUESTS = Metric(
    "cogalora_key_requests",
    "counter",
    "Requests to classification and catalogue routes made with a key, by key id (never the key) and status code.",
    ("key_id", "code"),
)
KEY_INPUTS = Metric("cogalora_key_inputs", "counter", "Inputs classified, by key id.", ("key_id",))
KEY_RATE_LIMITED = Metric(
    "cogalora_key_rate_limited",
    "counter",
    "Requests refused with 429 by a key's token bucket, by key id and limit (requests, rows).",
    ("key_id", "limit"),
)
KEY_FILE_RELOADS = Metric(
    "cogalora_key_file_reloads",
    "counter",
    "Key file reloads (on change or SIGHUP) by outcome: ok, or invalid (the keys in force were kept).",
    ("outcome",),
)

METRICS: tuple[Metric, ...] = tuple(value for value in tuple(globals().values()) if isinstance(value, Metric))
"""Every metric the service exports."""
