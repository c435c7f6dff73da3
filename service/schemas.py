"""What crosses the wire (DESIGN.md §5): request bodies, responses, the error envelope.

Each schema is defined once, here, and serves three purposes: validation at the edge, the OpenAPI
document, and serialization (the engine builds :class:`RowResult` objects and the route serializes
them with pydantic's Rust serializer). Input limits that depend on the settings are checked by
:func:`check_texts`, the one place that does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.errors import InvalidRequestError, PayloadTooLargeError

#: Adapter (checkpoint folder) names: no separators, no leading dot, at most 64 characters.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


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

    inputs: str | Annotated[list[str], Field(min_length=1)] = Field(
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
    """Size limits and text sanity, in one place (messages never echo the input)."""
    if len(texts) > max_client_batch:
        raise PayloadTooLargeError(f"{len(texts)} inputs; at most {max_client_batch} per request")
    for index, text in enumerate(texts):
        if len(text) > max_input_chars:
            raise PayloadTooLargeError(f"input {index} has {len(text)} characters; at most {max_input_chars}")
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
    loaded: bool = Field(description="In memory now; otherwise it loads on its first request.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Training-time metrics from cogalora.json.")


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


class UnloadResponse(BaseModel):
    name: str
    status: Literal["unloaded", "deleted"] = "unloaded"
