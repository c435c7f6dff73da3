"""The Ray Serve application: an HTTP ingress in front of N engine replicas with adapter affinity.

::

    client --HTTP--> Ray proxy --> Ingress (create_app: the single-process routes, middleware, errors)
                                     | ReplicaPool.submit: handle.options(multiplexed_model_id=adapter)
                                     v
                                   ClassifierReplica x N (repository + engine + batcher, own metrics)

- The ingress (``service.ray_serve.ingress``) runs the very app of ``python -m service``
  (``service.app.create_app``) with other components: a ``CatalogueRepository`` (the model
  directory scanned for metadata, nothing loaded) and a ``ReplicaPool`` in place of the batcher.
  Validation, keys, adapter scopes, per-key rates, the admin check, body limits, the error envelope
  and the ``/classify`` response are therefore the single-process ones; ``GET /replicas`` shows each
  key only its adapters. The key file is read by the ingress (its path must exist where it runs).
- Each :class:`~service.ray_serve.replica.ClassifierReplica` builds the same repository, engine and batcher as the
  single-process service. Its adapter loader is ``@serve.multiplexed`` with
  ``max_num_models_per_replica = max_loaded_adapters``: Ray learns which adapters each replica
  holds and routes a request (its adapter is the multiplexed model id) to a replica that holds it.
  Ray's per-replica LRU and the repository's LRU have the same bound and see the same accesses.
- Answers carry the replica's id and what it holds; the ingress adds ``X-Cogalora-Replica`` to the
  response and lists the replicas it has heard from at ``GET /replicas``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from ray import serve

from service.ray_serve.ingress import Ingress
from service.ray_serve.replica import ClassifierReplica
from service.settings import Settings

APP_NAME = "cogalora"


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
