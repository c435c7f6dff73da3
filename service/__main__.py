"""``python -m service [--host H] [--port P] [--model-dir D] [--SETTING VALUE ...]``: run the server.

One uvicorn worker. Exit status: 2 for a configuration problem found before serving (one line on
stderr names it and the fix), 1 when loading the models fails after the server started (the
reason on stderr), and that of SIGTERM/SIGINT after a graceful drain. ``--help`` lists every
setting; ``--print-settings`` prints the effective ones.
"""

from __future__ import annotations

import logging
import sys
from types import FrameType

import uvicorn

from service.about import VERSION
from service.app import create_app
from service.cli import PROG, StartupError, check_startup, describe_settings, read_configuration
from service.lifecycle import Service
from service.logs import configure_logging

log = logging.getLogger("cogalora.service")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT first marks the service as draining (/ready -> 503),
    and a failed model load stops it (the process must not stay up looking alive)."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.service.begin_drain()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.service.failure is not None:
            self.should_exit = True
        return await super().on_tick(counter)


def main(argv: list[str] | None = None) -> int:
    try:
        configuration = read_configuration(argv)
        if configuration.print_settings:
            print(describe_settings(configuration))
            return 0
        settings = configuration.settings
        check_startup(settings)
    except StartupError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    service: Service = app.state.service
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
        extra={"version": VERSION, "host": settings.host, "port": settings.port, "model_dir": str(settings.model_dir)},
    )
    DrainingServer(config, service).run()
    if service.failure is not None:
        print(f"{PROG}: error: {service.failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
