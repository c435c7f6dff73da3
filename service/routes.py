"""The HTTP routes (docs/service.md). A classification crosses this file once:

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

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from service import uploads
from service.about import NAME, runtime
from service.auth import AdminOnly, CatalogueReader, scoped
from service.catalogue import ADAPTER_NAME_PATTERN
from service.classification import classify_texts, service_of
from service.errors import InvalidRequestError
from service.metrics import CONTENT_TYPE
from service.responses import documented_errors, error_response
from service.schemas import (
    AdapterInfo,
    AdapterSource,
    AdaptersResponse,
    ClassifyBody,
    ClassifyResponse,
    ServerInfo,
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
    if service.serving:
        return Response(ready_body, media_type="application/json")
    state = service.state if service.state != "ready" else "engine restarting"
    return error_response(503, f"not ready: {state}", "not_ready", service.settings.retry_after_s)


@router.get(
    "/info",
    response_model=ServerInfo,
    responses=documented_errors(401, 403, 429),
    dependencies=[CatalogueReader],
    summary="What is served: version, device, resolved dtype, torch threads, the key's adapters and unservable "
    "folders.",
)
async def info(request: Request) -> ServerInfo:
    service = service_of(request)
    visible = scoped(request, service.repository) if service.repository is not None else None
    return ServerInfo(
        name=NAME,
        state=service.state,
        **runtime(service.settings),
        adapters=visible.names() if visible is not None else [],
        loaded=len(visible.loaded_names()) if visible is not None else 0,
        unavailable=visible.failures() if visible is not None else {},
    )


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
    loaded = visible.loaded_names()
    return AdaptersResponse(
        adapters=[AdapterInfo.of(description, description.name in loaded) for description in visible.adapters()],
        loaded=len(loaded),
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
        description = await asyncio.to_thread(repository.load, name)
    request.scope["state"]["cogalora"]["adapter"] = name
    log.info("adapter loaded", extra={"adapter": name})
    return AdapterInfo.of(description, name in repository.loaded_names())


_ARCHIVE_BODY = {"schema": {"type": "string", "format": "binary"}}


@router.put(
    "/adapters/{name}",
    status_code=201,
    response_model=AdapterInfo,
    responses=documented_errors(401, 403, 404, 409, 413, 422, 429, 503),
    dependencies=[AdminOnly],
    summary="Admin: add an adapter from an uploaded .tar.gz / .zip of its folder, or from a Hugging Face Hub id.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/gzip": _ARCHIVE_BODY,
                "application/zip": _ARCHIVE_BODY,
                "application/json": {"schema": AdapterSource.model_json_schema()},
            },
        }
    },
)
async def install_adapter(
    name: AdapterName,
    request: Request,
    replace: bool = Query(False, description="Replace an existing adapter of that name (else 409)."),
) -> Response:
    service = service_of(request)
    repository, _ = service.require_ready()
    body = await request.body()
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        source = _adapter_source(body)
        installed = await uploads.install(
            service, repository, name, replace, source=source.source, revision=source.revision
        )
    else:
        installed = await uploads.install(service, repository, name, replace, archive=body)
    request.scope["state"]["cogalora"]["adapter"] = name
    log.info("adapter installed", extra={"adapter": name})
    headers = {"X-Adapter-Revision": installed.revision} if installed.revision else None
    info = AdapterInfo.of(installed.description, name in repository.loaded_names())
    return JSONResponse(info.model_dump(mode="json"), status_code=201, headers=headers)


def _adapter_source(body: bytes) -> AdapterSource:
    """The JSON body of an install from a hub (422 naming the field when it is not one)."""
    try:
        return AdapterSource.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidRequestError(f"{where}: {first['msg']}"[:200]) from None


@router.delete(
    "/adapters/{name}",
    response_model=UnloadResponse,
    responses=documented_errors(401, 403, 404, 409, 422, 429, 503),
    dependencies=[AdminOnly],
    summary="Admin: unload an adapter until it is loaded again (requests still queued for it get 404); "
    "with delete_files=true also delete its folder.",
)
async def unload_adapter(
    name: AdapterName,
    request: Request,
    delete_files: bool = Query(False, description="Also delete the adapter's folder from the model directory."),
) -> UnloadResponse:
    service = service_of(request)
    repository, _ = service.require_ready()
    if delete_files:
        await uploads.remove(service, repository, name)
    else:
        async with service.admin_lock:
            await asyncio.to_thread(repository.unload, name)
    log.info("adapter %s", "deleted" if delete_files else "unloaded", extra={"adapter": name})
    return UnloadResponse(name=name, status="deleted" if delete_files else "unloaded")


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition."}},
    summary="Prometheus metrics.",
)
async def metrics(request: Request) -> Response:
    return Response(service_of(request).metrics.render(), media_type=CONTENT_TYPE)
