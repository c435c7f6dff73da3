"""The HTTP service (DESIGN.md §5), wired together: ``create_app(settings)``.

Where things live: request/response schemas in ``schemas.py``, routes in ``routes.py``, the TEI and
Open Inference routes in ``protocols/`` (all three share ``classification.py``), the raw ASGI edge
(request ids, keys and rates, body limit, access and audit logs, request metrics) in ``middleware.py``, who
may do what (keys, scopes, the admin check) in ``auth.py``, the error
envelope in ``responses.py``, start-up and draining in ``lifecycle.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.auth import Access
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
        version="0.2.0",
        summary="Text classification with conditionally gated LoRA adapters.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.access = access
    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, service=service, access=access)
    app.include_router(router)
    app.include_router(tei.router)
    app.include_router(oip.router)
    app.include_router(oip.infer_router)
    return app
