"""What crosses the wire (docs/service.md): request bodies, responses, the error envelope.

Each schema is defined once, here, and serves three purposes: validation at the edge, the OpenAPI
document, and serialization (``service.results`` names the engine's plain results as :class:`RowResult`
objects and the route serializes them with pydantic's Rust serializer). Only the HTTP layer imports
this module (tests/test_layers.py says which modules that is); what it describes comes from plain
dataclasses below it (``service.types``). Input limits that depend on the settings are checked by
:func:`check_texts`, the one place that does.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from cogalora.int8_kernels import Kernels
from service.errors import InvalidRequestError, PayloadTooLargeError
from service.types import AdapterDescription

_JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", type(None): "null"}


def _one_message(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One clear message instead of one per branch of the ``str | list[str]`` union."""
    try:
        return handler(value)
    except ValidationError:
        if isinstance(value, list) and value:
            bad = next((i for i, item in enumerate(value) if not isinstance(item, str)), None)
            if bad is not None:
                raise PydanticCustomError("inputs", "element {index} is not a string", {"index": bad}) from None
        what = "an empty list" if value == [] else _JSON_KINDS.get(type(value), type(value).__name__)
        raise PydanticCustomError(
            "inputs", "must be one text or a non-empty list of texts, got {what}", {"what": what}
        ) from None


#: ``inputs`` of /classify and the TEI routes: one text or a non-empty list of texts.
Inputs = Annotated[str | Annotated[list[str], Field(min_length=1)], WrapValidator(_one_message)]


class ErrorBody(BaseModel):
    """The one error envelope of every non-2xx answer."""

    error: str = Field(description="What went wrong, for a human.")
    error_type: str = Field(description="Machine-readable kind, e.g. unknown_adapter, queue_full, timeout.")


class ClassifyBody(BaseModel):
    """``POST /classify`` request."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"inputs": ["a great movie", "the plot was awful"], "adapter": "sst2"}]},
    )

    inputs: Inputs = Field(
        description="One text or a non-empty list of texts; the answer is always a list in input order."
    )
    adapter: str | None = Field(None, description="Adapter to use; optional when exactly one is available.")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Gate threshold tau for this request; default: the adapter's tau."
    )
    truncate: bool = Field(True, description="Truncate long inputs to the adapter's max_length; false: 413.")
    raw_scores: bool = Field(False, description="Also return each label's logit (before softmax) as raw_scores.")

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


def check_texts(texts: list[str], max_client_batch: int, max_input_chars: int) -> None:
    """Size limits and text sanity for every protocol, in one place (messages never echo the input).

    An empty or blank text is refused: the model would read only its special tokens and answer the
    adapter's prior with a confident-looking score.
    """
    if len(texts) > max_client_batch:
        raise PayloadTooLargeError(f"{len(texts)} inputs; at most {max_client_batch} per request")
    for index, text in enumerate(texts):
        if len(text) > max_input_chars:
            raise PayloadTooLargeError(f"input {index} has {len(text)} characters; at most {max_input_chars}")
        if not text.strip():
            raise InvalidRequestError(f"input {index} is empty (or only whitespace): send text to classify")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError(f"input {index} is not valid Unicode text (lone surrogate)") from None


class LabelScore(BaseModel):
    label: str
    score: float


class Flops(BaseModel):
    """Analytic FLOPs of this input alone, on its own (unpadded) length."""

    total: float
    adapter: float = Field(description="Adapter FLOPs executed (active sites).")
    adapter_saved: float = Field(description="Adapter FLOPs not executed because gates were off.")


class RowResult(BaseModel):
    """The answer for one input."""

    label: str
    score: float
    scores: list[LabelScore] = Field(description="Every label, highest score first.")
    active_adapters: int = Field(description="Adapter sites that ran for this input.")
    total_adapters: int = Field(
        description="Sites of the adapter's LoRA configuration (target modules x layers); dropped sites count as off."
    )
    active_modules: list[str] = Field(description="Sites that ran, e.g. layer.0.attention.query.")
    active_rank: int = Field(
        description="Sum over the sites that ran of the LoRA rank each used: rank x active_adapters, unless a "
        "RAD-LoRA router picked smaller ranks (288 = 36 sites at rank 8)."
    )
    active_ranks: list[int] | None = Field(
        None,
        description="The LoRA rank each site of active_modules used, in the same order (a RAD-LoRA router picks "
        "it per input; otherwise it is the adapter's rank); they sum to active_rank.",
    )
    tokens: int = Field(description="Tokens the model read (after truncation), special tokens included.")
    input_tokens: int = Field(description="Tokens of the whole input before truncation, special tokens included.")
    truncated: bool = Field(description="The input was cut to the adapter's max_length (input_tokens > tokens).")
    flops: Flops
    raw_scores: list[LabelScore] | None = Field(
        None, description="Every label's logit (before softmax), in the order of scores; only with raw_scores=true."
    )
    # Timings for headers and metrics, never serialized.
    queue_seconds: float = Field(0.0, exclude=True)
    inference_seconds: float = Field(0.0, exclude=True)
    tokenize_seconds: float = Field(0.0, exclude=True)


class ClassifyResponse(BaseModel):
    adapter: str
    results: list[RowResult]


class AdapterInfo(BaseModel):
    """One adapter of the model repository, loaded in memory or not."""

    name: str
    base_model: str
    method: str
    labels: list[str]
    tau: float
    max_length: int = Field(description="Longest input in tokens (the checkpoint's, capped by the encoder).")
    total_adapters: int = Field(description="Sites of its LoRA configuration (target modules x layers).")
    sites: list[str] = Field(
        default_factory=list,
        description="Those sites by name, layer by layer in the encoder's order (the names active_modules uses).",
    )
    dropped_sites: list[str] = Field(
        default_factory=list,
        description="Sites of the configuration that carry no adapter (pruned after training): always off.",
    )
    rank: int | None = Field(None, description="LoRA rank of its adapter matrices.")
    rank_set: list[int] | None = Field(
        None, description="RAD-LoRA: the ranks its routers choose from per input (0: off)."
    )
    loaded: bool = Field(description="In memory now; otherwise it loads on its first request.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Training-time metrics from cogalora.json.")

    @classmethod
    def of(cls, description: AdapterDescription, loaded: bool) -> AdapterInfo:
        """The catalogue's description of an adapter, and whether it is in memory now."""
        return cls(**asdict(description), loaded=loaded)


class AdaptersResponse(BaseModel):
    adapters: list[AdapterInfo]
    loaded: int = Field(description="Adapters in memory now.")
    max_loaded: int = Field(description="At most this many stay loaded; the least recently used is evicted.")
    unavailable: dict[str, str] = Field(
        default_factory=dict, description="Checkpoint folders that cannot be served, and why."
    )


class AdapterSource(BaseModel):
    """``PUT /adapters/{name}`` with a JSON body: where to fetch the adapter folder from."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"source": "hf://org/sst2-lora", "revision": "main"}]},
    )

    source: str = Field(max_length=200, description="A Hugging Face Hub model repository: hf://org/name.")
    revision: str | None = Field(
        None, max_length=128, description="Branch, tag or commit to fetch (default main); a commit pins it."
    )


class StatusResponse(BaseModel):
    status: str


class ServerInfo(BaseModel):
    """``GET /info``: what this server is and what it serves."""

    name: str
    version: str
    state: Literal["loading", "ready", "failed", "draining"]
    device: str = Field(description="Torch device the engine runs on.")
    dtype: str = Field(description="Precision of the encoder and adapters (auto resolved); routers run in float32.")
    int8_kernels: Kernels | None = Field(
        None,
        description="int8 on the CPU: whether quantizing and dequantizing run as the compiled C functions "
        "(native) or as torch operations (torch; same results, slower). Null for other dtypes and devices.",
    )
    engine_lanes: int = Field(description="Copies of the model that run forwards at once.")
    torch_threads: int = Field(description="torch intra-op threads of each lane.")
    engine_process: bool = Field(description="Whether the engine runs in a process of its own.")
    engine_processes: int = Field(
        description="Engine processes sharing the lanes (0: the engine runs in the API process)."
    )
    adapters: list[str] = Field(description="Servable adapters, loaded in memory or not (empty while loading).")
    loaded: int = Field(description="Adapters in memory now.")
    unavailable: dict[str, str] = Field(description="Checkpoint folders that cannot be served, and why.")


class UnloadResponse(BaseModel):
    name: str
    status: Literal["unloaded", "deleted"] = "unloaded"


class AdapterLiveStats(BaseModel):
    """One adapter's traffic since start (``adapter="other"`` gathers the rest under ``top:N`` labels)."""

    inputs: int = Field(description="Inputs classified.")
    mean_active_adapters: float | None = Field(description="Mean adapter sites that ran per input.")
    mean_active_rank: float | None = Field(description="Mean total LoRA rank used per input.")
    adapter_flops: float = Field(description="Adapter FLOPs executed.")
    adapter_flops_saved: float = Field(description="Adapter FLOPs skipped because gates were off.")
    shadow_checks: int = Field(description="Shadow dense checks run (0 while shadow_fraction is 0).")
    shadow_agreement: float | None = Field(description="Share of shadow checks whose dense label agreed.")
    routing_drift: float | None = Field(description="cogalora_routing_drift, once a full drift window was seen.")


class LiveStatsResponse(BaseModel):
    """``GET /console/stats``: what the console's live panel shows, from the service's own metrics."""

    uptime_s: float = Field(description="Seconds since the service started.")
    window_s: float = Field(description="The recent window the rates and percentiles cover, in seconds.")
    requests_total: int = Field(description="Classification requests since start (any protocol, any status).")
    errors_total: int = Field(description="Of those, answered with a status of 400 or more.")
    requests_per_s: float = Field(description="Classification requests per second over the window.")
    latency_p50_ms: float | None = Field(description="Median request latency over the window (histogram estimate).")
    latency_p99_ms: float | None = Field(description="99th percentile request latency over the window.")
    inflight: int = Field(description="Classification requests being handled now.")
    queue_depth: int = Field(description="Rows admitted and not running yet.")
    adapters_loaded: int = Field(description="Adapters in memory now.")
    adapters_available: int = Field(description="Servable adapters in the model repository.")
    shadow_fraction: float = Field(description="The shadow_fraction setting (0: no shadow dense checks).")
    drift_window: int = Field(description="The drift_window setting (0: no routing drift).")
    adapters: dict[str, AdapterLiveStats] = Field(description="Per adapter, since start.")
