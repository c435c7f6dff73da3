"""Text-embeddings-inference style routes, one per adapter, for Hugging Face's ``InferenceClient``.

``POST /models/{adapter}/predict`` answers like TEI's ``/predict``: one input (a string) -> a list of
``{"label", "score"}`` sorted by score; several (a list) -> a list of such lists.
``POST /models/{adapter}`` is the URL ``InferenceClient(model=URL).text_classification`` posts to; it
always answers one list per input (``[[...]]`` for a single string), the Inference API shape that
client unpacks (it takes element ``[0]`` of the answer; TEI's flat list would give it one label).

Both accept TEI's body (``inputs``, top-level ``truncate``/``raw_scores``) and the client's
(``inputs`` plus ``parameters``: ``truncate``, ``raw_scores``, ``top_k``, ``function_to_apply``,
and our gate ``threshold``); any other parameter is a 422. The body format is fixed, so routing
information travels in response headers (one comma-separated value per input).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from service.classification import Classified, classify_texts
from service.errors import InvalidRequestError
from service.responses import documented_errors
from service.schemas import Inputs, LabelScore, RowResult

router = APIRouter(tags=["Text Embeddings Inference (Hugging Face InferenceClient)"])

TEIFunction = Literal["softmax", "sigmoid", "none"]


class TEIParameters(BaseModel):
    """``parameters`` as Hugging Face's client sends them (``None`` values mean "the default")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    truncate: bool | None = Field(None, description="Truncate long inputs to max_length (default true); false: 413.")
    raw_scores: bool | None = Field(None, description="Scores are logits (same as function_to_apply='none').")
    top_k: int | None = Field(None, ge=1, description="Only the k best labels (default: every label).")
    function_to_apply: TEIFunction | None = Field(
        None, description="softmax (default): probabilities; sigmoid: per-label sigmoid of the logits; none: logits."
    )
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="CoGaLoRA gate threshold tau for this request; default: the adapter's."
    )


class TEIBody(BaseModel):
    """TEI ``/predict`` request; HF's client puts its options under ``parameters``."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"inputs": "a gripping film", "parameters": {"top_k": 2}}]},
    )

    inputs: Inputs = Field(description="One text or a non-empty list.")
    parameters: TEIParameters | None = None
    truncate: bool | None = Field(None, description="TEI's top-level form of parameters.truncate.")
    raw_scores: bool | None = Field(None, description="TEI's top-level form of parameters.raw_scores.")

    def options(self) -> TEIParameters:
        """``parameters`` merged with TEI's top-level fields; contradicting values are a 422."""
        merged = self.parameters or TEIParameters()
        for name in ("truncate", "raw_scores"):
            top, inner = getattr(self, name), getattr(merged, name)
            if top is not None and inner is not None and top != inner:
                raise InvalidRequestError(f"{name} is {top} at the top level but {inner} in parameters")
            if top is not None:
                merged = merged.model_copy(update={name: top})
        if merged.raw_scores and merged.function_to_apply not in (None, "none"):
            raise InvalidRequestError(
                f"raw_scores=true returns logits; it contradicts function_to_apply={merged.function_to_apply!r}"
            )
        return merged


_RANKED = TypeAdapter(list[LabelScore])
_ROUTING_HEADERS = {
    "X-Adapter": "The adapter that answered.",
    "X-Active-Adapters": "Adapter sites that ran, per input (comma-separated).",
    "X-Total-Adapters": "Sites of the adapter's LoRA configuration, per input.",
    "X-Flops": "Analytic FLOPs per input.",
    "X-Adapter-Flops": "Adapter FLOPs executed per input.",
    "X-Adapter-Flops-Saved": "Adapter FLOPs skipped (gates off) per input.",
    "X-Tokens": "Tokens read per input (after truncation).",
    "X-Input-Tokens": "Tokens per input before truncation.",
    "X-Truncated": "true/false per input.",
    "X-Queue-Time-Ms": "Longest wait of the request's inputs for a batch.",
    "X-Inference-Time-Ms": "Longest engine time of the request's batches.",
}
_DOCUMENTED_HEADERS = {
    name: {"description": text, "schema": {"type": "string"}} for name, text in _ROUTING_HEADERS.items()
}


def _ranked(row: RowResult, function: TEIFunction, top_k: int | None) -> list[LabelScore]:
    if function == "softmax":
        ranked = row.scores
    else:
        logits = row.raw_scores or []
        ranked = logits if function == "none" else [_sigmoid(entry) for entry in logits]
    return ranked[:top_k] if top_k else ranked


def _sigmoid(entry: LabelScore) -> LabelScore:
    # The order of logits is the order of their sigmoids: no re-sorting needed.
    logit = entry.score
    value = 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))
    return LabelScore.model_construct(label=entry.label, score=value)


def routing_headers(answer: Classified) -> dict[str, str]:
    """Per-input routing facts as comma-separated header values (the TEI body has no room for them)."""
    rows = answer.results

    def joined(values) -> str:
        return ",".join(str(value) for value in values)

    return {
        "X-Adapter": answer.adapter,
        "X-Active-Adapters": joined(row.active_adapters for row in rows),
        "X-Total-Adapters": joined(row.total_adapters for row in rows),
        "X-Flops": joined(f"{row.flops.total:.6g}" for row in rows),
        "X-Adapter-Flops": joined(f"{row.flops.adapter:.6g}" for row in rows),
        "X-Adapter-Flops-Saved": joined(f"{row.flops.adapter_saved:.6g}" for row in rows),
        "X-Tokens": joined(row.tokens for row in rows),
        "X-Input-Tokens": joined(row.input_tokens for row in rows),
        "X-Truncated": joined("true" if row.truncated else "false" for row in rows),
        **answer.timing_headers(),
    }


async def _predict(adapter: str, body: TEIBody, request: Request, nest_single: bool) -> Response:
    options = body.options()
    function: TEIFunction = "none" if options.raw_scores else (options.function_to_apply or "softmax")
    texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
    answer = await classify_texts(
        request,
        texts,
        adapter,
        threshold=options.threshold,
        truncate=True if options.truncate is None else options.truncate,
        raw_scores=function != "softmax",
    )
    ranked = [_ranked(row, function, options.top_k) for row in answer.results]
    if isinstance(body.inputs, str) and not nest_single:
        content = _RANKED.dump_json(ranked[0])
    else:
        content = b"[" + b",".join(_RANKED.dump_json(one) for one in ranked) + b"]"
    return Response(content, media_type="application/json", headers=routing_headers(answer))


_ERRORS: dict[int | str, dict[str, Any]] = documented_errors(401, 404, 413, 422, 429, 503, 504)


@router.post(
    "/models/{adapter}",
    response_model=list[list[LabelScore]],
    responses={200: {"headers": _DOCUMENTED_HEADERS}, **_ERRORS},
    summary="Hugging Face InferenceClient text_classification: one ranked list per input.",
)
async def inference_api(adapter: str, body: TEIBody, request: Request) -> Response:
    return await _predict(adapter, body, request, nest_single=True)


@router.post(
    "/models/{adapter}/predict",
    response_model=list[LabelScore] | list[list[LabelScore]],
    responses={200: {"headers": _DOCUMENTED_HEADERS}, **_ERRORS},
    summary="TEI /predict: a ranked list for one string input, a list of ranked lists for a list input.",
)
async def predict(adapter: str, body: TEIBody, request: Request) -> Response:
    return await _predict(adapter, body, request, nest_single=False)
