"""``python -m service.ray_serve --replicas N --host H --port P --model-dir D``: serve on Ray Serve.

Starts a local Ray instance (unless ``RAY_ADDRESS`` names a cluster to join), deploys the
application of :mod:`service.ray_serve.deployments` and serves until SIGTERM/SIGINT; then it
deletes the application and, when it started Ray itself, shuts Ray down.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from pydantic import ValidationError

from service.logs import configure_logging
from service.settings import DEFAULT_MODEL_DIR

log = logging.getLogger("cogalora.service")

#: Object store of a local Ray instance: requests and answers are small, the default (30 % of RAM) is not.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service.ray_serve",
        description=(
            "Serve CoGaLoRA classifiers on Ray Serve: N engine replicas behind one HTTP endpoint, each request "
            "routed to a replica that already holds its adapter. Starts a local Ray instance unless RAY_ADDRESS "
            "names a cluster. Other settings come from COGALORA_* variables, as for 'python -m service'."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas")
    parser.add_argument("--host", default="0.0.0.0", help="interface of Ray Serve's HTTP proxy")
    parser.add_argument("--port", type=int, default=8000, help="port of Ray Serve's HTTP proxy")
    parser.add_argument(
        "--model-dir", default=None, help=f"model repository (default: COGALORA_MODEL_DIR or {DEFAULT_MODEL_DIR})"
    )
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (= torch threads)")
    parser.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs reserved per replica")
    parser.add_argument(
        "--max-loaded-adapters", type=int, default=None, help="adapters each replica keeps (default: the setting's)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="replica i serves Prometheus metrics on this port + i (0: free ports, listed at GET /replicas)",
    )
    parser.add_argument(
        "--num-cpus",
        type=float,
        default=None,
        help="CPUs of the local Ray instance (default: replicas x replica CPUs); ignored with RAY_ADDRESS",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from service.ray_serve.deployments import APP_NAME, RayServeArgs, build_app
    except ImportError as exc:
        print(
            f"python -m service.ray_serve: Ray Serve is not installed ({exc}); pip install -e '.[ray]'", file=sys.stderr
        )
        return 2
    try:
        serve_args = RayServeArgs(
            model_dir=args.model_dir,
            replicas=args.replicas,
            replica_cpus=args.replica_cpus,
            replica_gpus=args.replica_gpus,
            max_loaded_adapters=args.max_loaded_adapters,
            metrics_port=args.metrics_port,
        )
        settings = serve_args.settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in exc.errors())
        print(f"python -m service.ray_serve: invalid setting ({problems})", file=sys.stderr)
        return 2
    if not settings.model_dir.is_dir():
        print(f"python -m service.ray_serve: model directory {settings.model_dir} does not exist", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)

    import ray
    from ray import serve

    joined = bool(os.environ.get("RAY_ADDRESS"))
    if joined:
        ray.init(log_to_driver=False)
    else:
        cpus = args.num_cpus if args.num_cpus is not None else args.replicas * args.replica_cpus
        ray.init(
            num_cpus=max(1, round(cpus)),
            num_gpus=None if args.replica_gpus else 0,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            log_to_driver=False,
        )
    # After ray.init, which installs a SIGTERM handler of its own that ends the process at once.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(serve_args), name=APP_NAME, route_prefix="/")
        log.info(
            "serving on Ray Serve",
            extra={"host": args.host, "port": args.port, "replicas": args.replicas, "cluster": joined},
        )
        print(f"ray_serve: ready on http://{args.host}:{args.port} with {args.replicas} replicas", flush=True)
        while not stop.wait(1.0):  # a timed wait, so the signal handler runs promptly
            pass
        log.info("stopping: deleting the application")
    finally:
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
            ray.shutdown()
    print("ray_serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
