"""The Ray Serve application: an HTTP ingress in front of N engine replicas with adapter affinity.

::

    client --HTTP--> Ray proxy --> Ingress (create_app: the single-process routes, middleware, errors)
                                     | ReplicaPool.submit: handle.options(multiplexed_model_id=adapter)
                                     v
                                   ClassifierReplica x N (repository + engine + batcher, own metrics)

- The ingress runs the very app of ``python -m service`` (``service.app.create_app``) with other
  components: a :class:`CatalogueRepository` (the model directory scanned for metadata, nothing
  loaded) and a :class:`ReplicaPool` in place of the batcher. Validation, keys, adapter scopes,
  per-key rates, the admin check, body limits, the error envelope and the ``/classify`` response
  are therefore the single-process ones; ``GET /replicas`` shows each key only its adapters. The
  key file is read by the ingress (its path must exist where the ingress runs).
- Each :class:`ClassifierReplica` builds the same repository, engine and batcher as the
  single-process service. Its adapter loader is ``@serve.multiplexed`` with
  ``max_num_models_per_replica = max_loaded_adapters``: Ray learns which adapters each replica
  holds and routes a request (its adapter is the multiplexed model id) to a replica that holds it.
  Ray's per-replica LRU and the repository's LRU have the same bound and see the same accesses.
- Answers carry the replica's id and what it holds; the ingress adds ``X-Cogalora-Replica`` to the
  response and lists the replicas it has heard from at ``GET /replicas``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import CatalogueReader, principal_of
from service.catalogue import CatalogueReads
from service.engine_client import EngineClient, LocalTransport
from service.engine_core import EngineCore
from service.errors import AdapterConflictError, NotReadyError, QueueFullError, RequestTimeoutError, ServiceError
from service.keys import Principal
from service.metrics import ServiceMetrics, service_metrics
from service.schemas import RowResult
from service.settings import Settings
from service.types import AdapterDescription, ClassifyRequest

log = logging.getLogger("cogalora.service")

APP_NAME = "cogalora"
REPLICA_HEADER = "X-Cogalora-Replica"
#: Extra seconds the ingress waits for a replica beyond the replica's own request timeout (its 504 wins).
HANDLE_GRACE_S = 5.0
#: Tries of one request when replicas die under it (then 503).
REPLICA_ATTEMPTS = 3


class RayServeArgs(BaseModel):
    """Arguments of the Ray Serve application (``serve run`` config ``args``, or the CLI's flags).

    Service settings not listed here come from the ``COGALORA_*`` environment of the process that
    builds the application, exactly as for ``python -m service``.
    """

    model_config = {"extra": "forbid"}

    model_dir: str | None = Field(None, description="Model repository (default: COGALORA_MODEL_DIR or models/).")
    replicas: int = Field(2, ge=1, description="Engine replicas; each holds its own base encoder and adapter LRU.")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica (torch threads follow it).")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica (set device=cuda too).")
    max_loaded_adapters: int | None = Field(None, ge=1, description="Adapters each replica keeps in memory.")
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests Ray lets into one replica at once (its batcher batches them)."
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Each replica serves its Prometheus metrics on this port + its rank (0: a free port); "
        "GET /replicas lists the addresses.",
    )

    def settings(self) -> Settings:
        """The service settings: ``COGALORA_*`` environment, overridden by these arguments."""
        overrides: dict[str, Any] = {}
        if self.model_dir is not None:
            overrides["model_dir"] = self.model_dir
        if self.max_loaded_adapters is not None:
            overrides["max_loaded_adapters"] = self.max_loaded_adapters
        settings = Settings(**overrides)
        if settings.torch_threads == 0:  # one replica = its reserved CPUs, not the whole machine
            settings = settings.model_copy(update={"torch_threads": max(1, int(self.replica_cpus))})
        return settings


@dataclass
class ReplicaAnswer:
    """What a replica returns for one request: results or the ServiceError to raise, and its state."""

    replica: str
    loaded: list[str]
    adapter_loads: dict[str, int]
    results: list[RowResult] | None = None
    error: ServiceError | None = None


@dataclass
class ReplicaReport:
    """The ingress's latest view of one replica (``GET /replicas``)."""

    replica: str
    loaded: list[str] = field(default_factory=list)
    adapter_loads: dict[str, int] = field(default_factory=dict)
    """Adapters this replica loaded on a request (Ray routed it there without holding it), and how often."""
    metrics_url: str | None = None
    requests: int = 0


# ---- the engine replica ---------------------------------------------------------------------------


class ClassifierReplica:
    """One engine: repository (LRU of adapters), engine and batcher, as in ``python -m service``."""

    async def __init__(self, settings: Settings, metrics_port: int = 0) -> None:
        context = serve.get_replica_context()
        self.replica = context.replica_tag
        self.settings = settings
        self.metrics = service_metrics(settings)
        core = await asyncio.to_thread(EngineCore.build, settings, self.metrics)
        self.repository = core.repository
        self.batcher = EngineClient(settings, core.repository.catalogue, LocalTransport(core))
        await self.batcher.start()
        self.metrics.bind(
            lambda: float(self.batcher.queue_depth),
            lambda: float(len(self.repository.loaded_names())),
            lambda: float(len(self.repository.names())),
        )
        self.adapter_loads: dict[str, int] = {}
        self.metrics_url = _serve_metrics(self.metrics, metrics_port, _rank(context))
        # Ray's LRU of adapters per replica, with the repository's bound: what Ray routes by.
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=settings.max_loaded_adapters)(
            self._make_loader()
        )
        log.info("replica ready", extra={"replica": self.replica, "metrics": self.metrics_url})

    def _make_loader(self):
        repository = self.repository

        async def load_adapter(name: str) -> str:
            """Ray calls this when it routed ``name`` here and does not list it as held by this replica."""
            if name not in repository.loaded_names():
                self.adapter_loads[name] = self.adapter_loads.get(name, 0) + 1
                await asyncio.to_thread(lambda: repository.release(repository.acquire(name, 30.0)))
            return name

        return load_adapter

    async def classify(self, request: ClassifyRequest) -> ReplicaAnswer:
        try:
            await self._multiplexed(serve.get_multiplexed_model_id() or request.adapter)
            results = await self.batcher.submit(request)
        except ServiceError as exc:
            return self._answer(error=exc)
        return self._answer(results=results)

    def report(self) -> ReplicaReport:
        return ReplicaReport(
            replica=self.replica,
            loaded=self.repository.loaded_names(),
            adapter_loads=dict(self.adapter_loads),
            metrics_url=self.metrics_url,
        )

    def _answer(self, **outcome: Any) -> ReplicaAnswer:
        return ReplicaAnswer(
            replica=self.replica,
            loaded=self.repository.loaded_names(),
            adapter_loads=dict(self.adapter_loads),
            **outcome,
        )

    async def __del__(self) -> None:
        await self.batcher.stop()


def _rank(context: Any) -> int:
    rank = getattr(context, "rank", None)
    return int(getattr(rank, "rank", rank) or 0)


def _serve_metrics(metrics: ServiceMetrics, base_port: int, rank: int) -> str | None:
    """Serve this replica's registry over HTTP on ``base_port + rank`` (0: a free port); returns its URL."""
    from prometheus_client import start_http_server

    port = base_port + rank if base_port else 0
    try:
        server, _ = start_http_server(port, addr="0.0.0.0", registry=metrics.registry)
    except OSError as exc:
        log.warning("replica metrics not exported: port %d: %s", port, exc)
        return None
    host = os.environ.get("RAY_NODE_IP_ADDRESS") or socket.gethostbyname(socket.gethostname())
    return f"http://{host}:{server.server_port}/metrics"


# ---- the ingress ----------------------------------------------------------------------------------

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


def build_app(args: RayServeArgs | dict[str, Any] | None = None):
    """The Ray Serve application (an application builder: ``import_path: service.ray_serve:build_app``)."""
    args = args if isinstance(args, RayServeArgs) else RayServeArgs.model_validate(args or {})
    settings = args.settings()
    if not Path(settings.model_dir).is_dir():
        raise ValueError(f"model directory {settings.model_dir} does not exist or is not a directory")
    replica = serve.deployment(
        ClassifierReplica,
        name="ClassifierReplica",
        num_replicas=args.replicas,
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
        graceful_shutdown_timeout_s=settings.request_timeout_s,
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name="Ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(256, args.max_ongoing_requests * args.replicas),
    )
    return ingress.bind(replica.bind(settings, args.metrics_port), settings)
