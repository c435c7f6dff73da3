"""The HTTP service (DESIGN.md §5), wired together: ``create_app(settings)``.

Where things live: request/response schemas in ``schemas.py``, routes in ``routes.py``, the TEI and
Open Inference routes in ``protocols/`` (all three share ``classification.py``), the raw ASGI edge
(request ids, API key, body limit, access log, request metrics) in ``middleware.py``, the error
envelope in ``responses.py``, start-up and draining in ``lifecycle.py``, the web console in ``console.py``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

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

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="CoGaLoRA Serve",
        version="0.2.0",
        summary="Text classification with conditionally gated LoRA adapters.",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, service=service)
    app.include_router(router)
    app.include_router(tei.router)
    app.include_router(oip.router)
    app.include_router(oip.infer_router)
    if settings.console:
        install_console(app)
    return app
