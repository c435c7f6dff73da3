"""The web console: one page at ``/`` (also ``/console``), its script and style, and ``/console/stats``.

The page (``service/static/``) is plain HTML, CSS and JavaScript served by the service itself: no
CDN, no build step, and it works offline. It calls the public API (``/adapters``, ``/classify``)
and ``/console/stats``, sending the API key it asks the user for when the service has one; the page
and its files need no key (they hold no data). Everything the page shows from the service or the
user is written as text, never as HTML, and the Content-Security-Policy below allows scripts,
styles and connections from this origin only, and no inline script at all.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from service.auth import CatalogueReader, principal_of
from service.live_stats import LiveStats
from service.responses import documented_errors
from service.schemas import LiveStatsResponse

#: The page's files, by the name they are served under, and their media types.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()


@cache
def _static(name: str) -> bytes:
    return resources.files("service").joinpath("static", name).read_bytes()


def _file_response(name: str) -> Response:
    return Response(_static(name), media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)


@router.get("/", include_in_schema=False)
@router.get("/console", include_in_schema=False)
async def page() -> Response:
    return _file_response("index.html")


@router.get("/console/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    if name not in STATIC_FILES:
        raise HTTPException(404, "Not Found")
    return _file_response(name)


@router.get(
    "/console/stats",
    response_model=LiveStatsResponse,
    responses=documented_errors(401, 403, 429),
    dependencies=[CatalogueReader],
    summary="What the console's live panel shows: request rate and latency over a recent window, per-adapter "
    "routing since start (the key's adapters), from the service's own metrics.",
)
async def stats(request: Request) -> LiveStatsResponse:
    summary = request.app.state.live_stats.summary()
    principal = principal_of(request)
    summary.adapters = {name: stats for name, stats in summary.adapters.items() if principal.may_use(name)}
    return summary


def install_console(app: FastAPI) -> None:
    """Serve the console on ``app`` (whose ``state.service`` is set)."""
    app.state.live_stats = LiveStats(app.state.service)
    app.include_router(router)
