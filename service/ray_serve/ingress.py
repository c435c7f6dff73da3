"""The HTTP ingress of the Ray Serve application: the single-process app in front of the replicas.

The ingress runs the very app of ``python -m service`` (``service.app.create_app``) with other
components: a :class:`CatalogueRepository` (the model directory scanned for metadata, nothing loaded)
and a :class:`ReplicaPool` in place of the batcher. Validation, keys, adapter scopes, per-key rates,
the admin check, body limits, the error envelope and the ``/classify`` response are therefore the
single-process ones. Answers carry the replica's id: the ingress adds ``X-Cogalora-Replica`` to the
response and lists the replicas it has heard from at ``GET /replicas`` (each key sees only its adapters).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from pathlib import Path
from typing import Any

from fastapi import Request
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import CatalogueReader, principal_of
from service.catalogue import CatalogueReads
from service.errors import AdapterConflictError, NotReadyError, QueueFullError, RequestTimeoutError
from service.keys import Principal
from service.metrics import ServiceMetrics
from service.ray_serve.replica import ReplicaAnswer, ReplicaReport
from service.schemas import RowResult
from service.settings import Settings
from service.types import AdapterDescription, ClassifyRequest

log = logging.getLogger("cogalora.service")

REPLICA_HEADER = "X-Cogalora-Replica"
#: Extra seconds the ingress waits for a replica beyond the replica's own request timeout (its 504 wins).
HANDLE_GRACE_S = 5.0
#: Tries of one request when replicas die under it (then 503).
REPLICA_ATTEMPTS = 3

_ROUTED: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("cogalora_routed", default=None)


class CatalogueRepository(CatalogueReads):
    """The repository as the ingress sees it: the scanned catalogue, and what replicas say they hold.

    ``resolve`` and ``adapters`` answer exactly as the single-process repository does (same errors);
    ``loaded`` means "held by a replica that answered lately". Loading and unloading are per
    replica under Ray (adapters load on demand), so the admin routes answer 409, installs and
    deletions (``PUT /adapters/{name}``, ``DELETE ...?delete_files=true``) too, before the folder
    appears or goes: the replicas would not see the change until they restart.
    """

    def __init__(self, settings: Settings) -> None:
        from service.catalogue import Catalogue

        self.catalogue = Catalogue(settings.model_dir)
        self.catalogue.scan()
        self.max_loaded = settings.max_loaded_adapters
        self.replicas: dict[str, ReplicaReport] = {}

    def loaded_names(self) -> list[str]:
        return sorted({name for report in self.replicas.values() for name in report.loaded})

    def load(self, name: str, replace: bool = False) -> AdapterDescription:
        raise AdapterConflictError("under Ray Serve adapters load on demand on each replica; redeploy to reload")

    def unload(self, name: str) -> None:
        raise AdapterConflictError("under Ray Serve adapters are evicted per replica (LRU); redeploy to unload")

    def validate(self, directory: Path) -> None:
        """Refuses runtime installs: every replica reads the model directory once, at its start."""
        raise AdapterConflictError(
            "under Ray Serve adapters cannot be added at runtime (each replica scans the model directory at its "
            "start): put the folder in the model directory and redeploy"
        )

    def record(self, answer: ReplicaAnswer) -> None:
        report = self.replicas.setdefault(answer.replica, ReplicaReport(answer.replica))
        report.loaded = list(answer.loaded)
        report.adapter_loads = dict(answer.adapter_loads)
        report.requests += 1


class ReplicaPool:
    """The batcher as the ingress sees it: each request goes to a replica that holds its adapter."""

    queue_depth = 0
    """The ingress queues nothing itself; each replica's batcher queues (its own metrics)."""

    def __init__(self, handle: DeploymentHandle, repository: CatalogueRepository, settings: Settings) -> None:
        self.handle = handle
        self.repository = repository
        self.timeout_s = settings.request_timeout_s + HANDLE_GRACE_S
        self.retry_after = float(settings.retry_after_s)

    async def start(self) -> None:
        """Reach a replica once before /ready turns 200: the handle's router then knows the replicas."""
        await self.refresh()

    async def stop(self) -> None:
        return None

    async def submit(self, request: ClassifyRequest) -> list[RowResult]:
        """The answer of a replica that holds the adapter. Classification is idempotent: when the replica
        dies under the request (``RayActorError``), it is sent again, to another replica."""
        for attempt in range(1, REPLICA_ATTEMPTS + 1):
            call = self.handle.options(multiplexed_model_id=request.adapter).classify.remote(request)
            try:
                answer: ReplicaAnswer = await asyncio.wait_for(call, self.timeout_s)
                break
            except TimeoutError:
                call.cancel()
                raise RequestTimeoutError(f"no replica answered within {self.timeout_s:g} s; retry later") from None
            except BackPressureError:
                raise QueueFullError("every replica is at its request limit; retry later", self.retry_after) from None
            except (RayActorError, DeploymentUnavailableError) as exc:
                if attempt == REPLICA_ATTEMPTS:
                    raise NotReadyError("no engine replica is available; retry shortly", self.retry_after) from None
                log.warning("replica lost under a request (%s); sending it again", type(exc).__name__)
                await asyncio.sleep(0.2 * attempt)  # lets Ray's router drop the dead replica
        self.repository.record(answer)
        routed = _ROUTED.get()
        if routed is not None:
            routed["replica"] = answer.replica
        if answer.error is not None:
            raise answer.error
        assert answer.results is not None
        return answer.results

    async def refresh(self) -> list[ReplicaReport]:
        """Ask replicas for their state (each call reaches one replica; Ray picks which)."""
        reports = await asyncio.gather(
            *(self.handle.report.remote() for _ in range(max(1, len(self.repository.replicas) * 2))),
            return_exceptions=True,
        )
        for report in reports:
            if isinstance(report, ReplicaReport):
                known = self.repository.replicas.get(report.replica)
                report.requests = known.requests if known is not None else 0
                self.repository.replicas[report.replica] = report
        return list(self.repository.replicas.values())


class ReplicaHeader:
    """ASGI middleware: adds ``X-Cogalora-Replica`` naming the replica that answered a request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        routed: dict[str, str] = {}
        token = _ROUTED.set(routed)

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start" and "replica" in routed:
                MutableHeaders(scope=message).append(REPLICA_HEADER, routed["replica"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            _ROUTED.reset(token)


class Ingress:
    """The HTTP front: ``create_app`` over a catalogue and a replica pool (built at replica start)."""

    def __init__(self, classifier: DeploymentHandle, settings: Settings) -> None:
        self.classifier = classifier
        self.settings = settings

    def __serve_build_asgi_app__(self):
        from fastapi.responses import JSONResponse

        from service.app import create_app

        pool: dict[str, ReplicaPool] = {}

        async def components(settings: Settings, metrics: ServiceMetrics):
            repository = await asyncio.to_thread(CatalogueRepository, settings)
            pool["replicas"] = ReplicaPool(self.classifier, repository, settings)
            return repository, pool["replicas"]

        app = create_app(self.settings, components)

        @app.get(
            "/replicas",
            dependencies=[CatalogueReader],
            summary="Ray Serve: the engine replicas that answered, which of the key's adapters they hold, metrics.",
        )
        async def replicas(request: Request) -> JSONResponse:
            if "replicas" not in pool:
                raise NotReadyError("not ready: loading", retry_after=self.settings.retry_after_s)
            reports = await pool["replicas"].refresh()
            principal = principal_of(request)
            return JSONResponse(
                {"replicas": [_visible(report, principal) for report in sorted(reports, key=lambda r: r.replica)]}
            )

        app.add_middleware(ReplicaHeader)
        return app


def _visible(report: ReplicaReport, principal: Principal) -> dict[str, Any]:
    """A replica's report with only the adapters ``principal`` may see."""
    return {
        **report.__dict__,
        "loaded": [name for name in report.loaded if principal.may_use(name)],
        "adapter_loads": {name: n for name, n in report.adapter_loads.items() if principal.may_use(name)},
    }
