"""The HTTP routes (DESIGN.md §5). A classification crosses this file once:

``POST /classify`` -> body validated by :class:`~service.schemas.ClassifyBody` ->
:func:`~service.classification.classify_texts` (size limits, adapter resolved by the repository,
``batcher.submit``: admission, adapter pinning, tokenization, queue, engine; metrics) ->
:class:`~service.schemas.ClassifyResponse`. The TEI and Open Inference routes (``service/protocols/``)
take the same path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from service.auth import AdminOnly, CatalogueReader, scoped
from service.classification import classify_texts, service_of
from service.metrics import CONTENT_TYPE
from service.responses import documented_errors, error_response
from service.schemas import (
    ADAPTER_NAME_PATTERN,
    AdapterInfo,
    AdaptersResponse,
    ClassifyBody,
    ClassifyResponse,
    StatusResponse,
    UnloadResponse,
)

log = logging.getLogger("cogalora.service")

router = APIRouter()

AdapterName = Annotated[
    str, PathParam(pattern=ADAPTER_NAME_PATTERN, max_length=64, description="Checkpoint folder name.")
]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=documented_errors(401, 404, 413, 422, 429, 503, 504),
    summary="Classify one text or a list of texts with an adapter the key may use.",
)
async def classify(body: ClassifyBody, request: Request) -> Response:
    answer = await classify_texts(
        request,
        body.texts,
        body.adapter,
        threshold=body.threshold,
        truncate=body.truncate,
        raw_scores=body.raw_scores,
    )
    response = ClassifyResponse.model_construct(adapter=answer.adapter, results=answer.results)
    content = response.model_dump_json(exclude_none=True)
    return Response(content, media_type="application/json", headers=answer.timing_headers())


@router.get("/health", response_model=StatusResponse, summary="Liveness: 200 while the process runs.")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=StatusResponse,
    responses=documented_errors(503),
    summary="Readiness: 200 once the encoders are loaded and warmed up; 503 before and while draining.",
)
async def ready(request: Request) -> Response:
    return readiness_response(request, '{"status":"ready"}')


def readiness_response(request: Request, ready_body: str) -> Response:
    """``ready_body`` (200) once the service is ready, else the 503 ``not_ready`` envelope (any protocol)."""
    service = service_of(request)
    if service.state == "ready":
        return Response(ready_body, media_type="application/json")
    return error_response(503, f"not ready: {service.state}", "not_ready", service.settings.retry_after_s)


@router.get(
    "/adapters",
    response_model=AdaptersResponse,
    responses=documented_errors(401, 403, 429, 503),
    dependencies=[CatalogueReader],
    summary="Every servable adapter the key may use (loaded or not), the memory bound and unservable folders.",
)
async def adapters(request: Request) -> AdaptersResponse:
    repository, _ = service_of(request).require_ready()
    visible = scoped(request, repository)
    return AdaptersResponse(
        adapters=visible.adapters(),
        loaded=len(visible.loaded_names()),
        max_loaded=repository.max_loaded,
        unavailable=visible.failures(),
    )


@router.post(
    "/adapters/{name}",
    status_code=201,
    response_model=AdapterInfo,
    responses=documented_errors(401, 403, 404, 409, 422, 429, 503),
    dependencies=[AdminOnly],
    summary="Admin: (re)read the checkpoint folder <model_dir>/<name> and load it now.",
)
async def load_adapter(name: AdapterName, request: Request) -> AdapterInfo:
    service = service_of(request)
    repository, _ = service.require_ready()
    async with service.admin_lock:
        loaded = await asyncio.to_thread(repository.load, name)
    request.scope["state"]["cogalora"]["adapter"] = name
    log.info("adapter loaded", extra={"adapter": name})
    return loaded


@router.delete(
    "/adapters/{name}",
    response_model=UnloadResponse,
    responses=documented_errors(401, 403, 404, 422, 429, 503),
    dependencies=[AdminOnly],
    summary="Admin: unload an adapter until it is loaded again (requests still queued for it get 404).",
)
async def unload_adapter(name: AdapterName, request: Request) -> UnloadResponse:
    service = service_of(request)
    repository, _ = service.require_ready()
    async with service.admin_lock:
        await asyncio.to_thread(repository.unload, name)
    log.info("adapter unloaded", extra={"adapter": name})
    return UnloadResponse(name=name)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition."}},
    summary="Prometheus metrics.",
)
async def metrics(request: Request) -> Response:
    return Response(service_of(request).metrics.render(), media_type=CONTENT_TYPE)
