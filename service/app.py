"""The HTTP service (docs/architecture.md), wired together: ``create_app(settings)``.

Where things live: request/response schemas in ``schemas.py``, routes in ``routes.py``, the TEI and
Open Inference routes in ``protocols/`` (all three share ``classification.py``), the raw ASGI edge
(request ids, keys and rates, body limit, access and audit logs, request metrics) in ``middleware.py``, who
may do what (keys, scopes, the admin check) in ``auth.py``, the error envelope in ``responses.py``,
start-up and draining in ``lifecycle.py``, the web console in ``console.py``.
The documentation pages (``/docs``, ``/redoc``) load their scripts from this server, never from a CDN, so they
work offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.about import VERSION
from service.auth import Access
from service.console import install_console
from service.lifecycle import ComponentFactory, Service, build_components
from service.middleware import EdgeMiddleware
from service.protocols import oip, tei
from service.responses import install_error_handlers
from service.routes import router
from service.settings import Settings


def create_app(settings: Settings | None = None, components: ComponentFactory | None = None) -> FastAPI:
    """Build the app; ``components`` replaces the real repository/engine/batcher (tests)."""
    settings = settings or Settings()
    service = Service(settings, components or build_components)
    access = Access(settings, service.metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await service.start()
        reload_on_sighup = settings.key_file is not None and threading.current_thread() is threading.main_thread()
        if reload_on_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, access.reload_keys)
        try:
            yield
        finally:
            if reload_on_sighup:
                with contextlib.suppress(RuntimeError):
                    asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await service.stop()

    app = FastAPI(
        title="CoGaLoRA Serve",
        version=VERSION,
        summary="Text classification with conditionally gated LoRA adapters.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.access = access
    install_error_handlers(app)
    install_docs(app)
    app.add_middleware(EdgeMiddleware, service=service, access=access)
    app.include_router(router)
    app.include_router(tei.router)
    app.include_router(oip.router)
    app.include_router(oip.infer_router)
    if settings.console:
        install_console(app)
    return app


#: Swagger UI (Apache-2.0) and ReDoc (MIT) as the fastapi-offline package ships them.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
DOCS_ASSETS_URL = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with their scripts, styles and icon served from ``/docs/assets``."""
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from the public validator
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
