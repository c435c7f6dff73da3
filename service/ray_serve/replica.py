"""One engine replica of the Ray Serve application (``service.ray_serve.deployments``).

Each :class:`ClassifierReplica` builds the same repository, engine and batcher as the single-process
service, with an :class:`~service.engine_client.EngineClient` in front, and answers the ingress with
the named results (``service.results``) and what it holds. Its adapter loader is ``@serve.multiplexed``
with ``max_num_models_per_replica = max_loaded_adapters``: Ray learns which adapters each replica
holds and routes a request (its adapter is the multiplexed model id) to a replica that holds it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from service.engine_client import EngineClient, LocalTransport
from service.engine_core import EngineCore
from service.errors import ServiceError
from service.metrics import ServiceMetrics, service_metrics
from service.schemas import RowResult
from service.settings import Settings
from service.types import ClassifyRequest

log = logging.getLogger("cogalora.service")


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
