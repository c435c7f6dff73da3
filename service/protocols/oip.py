"""The Open Inference Protocol v2 (KServe, Triton), over the one classification path.

Health (``/v2/health/live``, ``/v2/health/ready``), server and model metadata (``/v2``,
``/v2/models/{adapter}``), model readiness and ``POST /v2/models/{adapter}/infer``; what the requests
and answers look like on the wire is ``service.protocols.oip_codec``. Errors keep the service's
envelope, ``{"error", "error_type"}``: the protocol's ``{"error": ...}`` plus a machine-readable kind,
with the status codes of ``/classify``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.auth import scoped
from service.classification import classify_texts, service_of
from service.protocols.oip_codec import (
    OUTPUTS,
    PLATFORM,
    BinaryTensorRoute,
    InferRequestBody,
    InferResponseBody,
    LiveResponse,
    ModelMetadata,
    ModelReadyResponse,
    ReadyResponse,
    ServerMetadata,
    TensorMetadata,
    infer_response,
    request_options,
    request_texts,
    requested_outputs,
)
from service.responses import documented_errors
from service.routes import readiness_response

router = APIRouter(tags=["Open Inference Protocol v2 (KServe, Triton)"])
infer_router = APIRouter(tags=["Open Inference Protocol v2 (KServe, Triton)"], route_class=BinaryTensorRoute)


@router.get("/v2/health/live", response_model=LiveResponse, summary="OIP liveness: 200 while the process runs.")
async def live() -> LiveResponse:
    return LiveResponse(live=True)


@router.get(
    "/v2/health/ready",
    response_model=ReadyResponse,
    responses=documented_errors(503),
    summary="OIP readiness: 200 once the preloaded adapters are loaded and warmed up; 503 before and while draining.",
)
async def ready(request: Request) -> Response:
    return readiness_response(request, '{"ready":true}')


@router.get("/v2", response_model=ServerMetadata, summary="OIP server metadata.")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="cogalora-serve", version=request.app.version, extensions=["binary_tensor_data"])


@router.get(
    "/v2/models/{adapter}",
    response_model=ModelMetadata,
    responses=documented_errors(401, 404, 422, 429, 503),
    summary="OIP model metadata: the input tensor, every output tensor and the labels of an adapter.",
)
async def model_metadata(adapter: str, request: Request) -> ModelMetadata:
    repository, _ = service_of(request).require_ready()
    info = scoped(request, repository).info(adapter)
    outputs = [
        TensorMetadata(name=name, datatype=output.datatype, shape=[-1, len(info.labels)] if output.per_label else [-1])
        for name, output in OUTPUTS.items()
    ]
    return ModelMetadata(
        name=info.name,
        platform=PLATFORM,
        inputs=[TensorMetadata(name="text", datatype="BYTES", shape=[-1])],
        outputs=outputs,
        labels=info.labels,
        parameters={
            "base_model": info.base_model,
            "method": info.method,
            "tau": info.tau,
            "max_length": info.max_length,
            "total_adapters": info.total_adapters,
        },
    )


@router.get(
    "/v2/models/{adapter}/ready",
    response_model=ModelReadyResponse,
    responses=documented_errors(401, 404, 422, 429, 503),
    summary="OIP model readiness: 200 when the service is ready and serves this adapter (loaded now or on demand).",
)
async def model_ready(adapter: str, request: Request) -> ModelReadyResponse:
    repository, _ = service_of(request).require_ready()
    return ModelReadyResponse(name=scoped(request, repository).info(adapter).name, ready=True)


@infer_router.post(
    "/v2/models/{adapter}/infer",
    response_model=InferResponseBody,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "JSON, or binary outputs when asked for."},
        **documented_errors(401, 404, 413, 422, 429, 503, 504),
    },
    summary="OIP inference: one BYTES tensor of texts in; label, score, scores and routing facts out.",
)
async def infer(adapter: str, body: InferRequestBody, request: Request) -> Response:
    texts = request_texts(body)
    options = request_options(body)
    requested_outputs(body, options.binary_output)  # reject unknown outputs before any work
    repository, _ = service_of(request).require_ready()
    labels = scoped(request, repository).info(adapter).labels  # the column order of "scores"
    answer = await classify_texts(request, texts, adapter, threshold=options.threshold, truncate=options.truncate)
    return infer_response(body, answer, labels, options.binary_output)
