"""Rendering errors: the one envelope ``{"error", "error_type"}`` for every non-2xx answer.

Messages never echo request text or server paths: validation errors name the field and the
problem, bounded in length.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ServiceError
from service.schemas import ErrorBody

log = logging.getLogger("cogalora.service")

HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 422: "invalid_request"}
"""The ``error_type`` of the HTTP errors the framework raises itself (no route, wrong method, body limits)."""


def short(value: str, limit: int = 64) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def error_response(status: int, message: str, error_type: str, retry_after: float | None = None) -> JSONResponse:
    headers = {}
    if retry_after is not None or status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after or 1)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def service_error_response(exc: ServiceError) -> JSONResponse:
    return error_response(exc.status_code, exc.message, exc.error_type, exc.retry_after)


def documented_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries: these status codes answer with the error envelope."""
    return {code: {"model": ErrorBody} for code in codes}


def _validation_message(errors: list[dict[str, Any]], content_type: str) -> str:
    """A short, path-free message that never echoes the offending input."""
    if "json" not in content_type.lower() and any(err.get("loc", ())[:1] == ("body",) for err in errors):
        # FastAPI reads a body as JSON only when the request says so (curl -d sends a form type).
        got = f"content-type {short(content_type, 64)!r}" if content_type else "no content-type"
        return f"the body must be JSON sent with the header 'content-type: application/json' (got {got})"
    if any(err.get("type") == "json_invalid" for err in errors):
        return "malformed JSON body"
    parts = []
    for err in errors[:3]:
        loc = [short(str(p), 40) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {short(str(err.get('msg', 'invalid')), 120)}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        return error_response(422, _validation_message(list(exc.errors()), content_type), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): a malformed request
            return error_response(422, "malformed request body", "invalid_request")
        error_type = HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, str(exc.detail), error_type)
        for key, value in (exc.headers or {}).items():
            response.headers.setdefault(key, value)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal server error", "internal_error")
