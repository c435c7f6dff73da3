"""``python -m service [--host H] [--port P] [--model-dir D]``: run the server (one uvicorn worker)."""

from __future__ import annotations

import argparse
import logging
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from cogalora.precision import DTYPE_CHOICES
from service.app import create_app
from service.lifecycle import Service
from service.logs import configure_logging
from service.settings import DEFAULT_MODEL_DIR, Settings

log = logging.getLogger("cogalora.service")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=(
            "Serve CoGaLoRA text classifiers over HTTP. Every setting also comes from a COGALORA_* "
            "environment variable (see docs/service.md); a flag given here overrides its variable."
        ),
    )
    parser.add_argument("--host", default=None, help="Interface to listen on. Env: COGALORA_HOST (default 0.0.0.0).")
    parser.add_argument(
        "--port", type=int, default=None, help="TCP port to listen on. Env: COGALORA_PORT (default 8000)."
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help=(
            "Model repository: one checkpoint folder per adapter (scanned at start, loaded on demand). "
            f"Env: COGALORA_MODEL_DIR (default {DEFAULT_MODEL_DIR})."
        ),
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPE_CHOICES),
        default=None,
        help="Encoder precision; auto = the fastest the device runs natively (bfloat16 on CPUs with avx512_bf16). "
        "Env: COGALORA_DTYPE (default auto).",
    )
    parser.add_argument(
        "--max-loaded-adapters",
        type=int,
        default=None,
        help="Adapters kept in memory; the least recently used idle one is evicted beyond it, and adapters "
        "load on their first request. Env: COGALORA_MAX_LOADED_ADAPTERS (default 256).",
    )
    return parser.parse_args(argv)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT first marks the service as draining (/ready -> 503)."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.service.begin_drain()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "model_dir": args.model_dir,
            "dtype": args.dtype,
            "max_loaded_adapters": args.max_loaded_adapters,
        }.items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in exc.errors())
        print(f"python -m service: invalid setting ({problems})", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=settings.request_timeout_s + 10,
    )
    log.info(
        "starting",
        extra={"host": settings.host, "port": settings.port, "model_dir": str(settings.model_dir)},
    )
    DrainingServer(config, app.state.service).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
