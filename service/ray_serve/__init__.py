"""CoGaLoRA Serve on Ray Serve: N engine replicas with adapter-affinity routing (docs/scale-out.md).

Needs the optional extra: ``pip install -e '.[ray]'``. Start a local cluster with
``python -m service.ray_serve --replicas N``; on a real cluster, ``serve run deploy/ray/serve.yaml``.
"""

from service.ray_serve.deployments import APP_NAME, RayServeArgs, build_app
from service.ray_serve.ingress import REPLICA_HEADER

__all__ = ["APP_NAME", "REPLICA_HEADER", "RayServeArgs", "build_app"]
