"""The engine in a process of its own: :func:`run` (the process's target), or by hand
``python -m service.engine_process --socket PATH``.

The API process (``python -m service``) starts it (``service.engine_launcher``): it connects to
the API process's Unix socket, receives the settings, builds the
:class:`~service.engine_core.EngineCore` and then serves messages (``service.ipc``) until told to
stop or until the socket closes (the API process is gone). The forward then never competes with
HTTP parsing, JSON and tokenization for one interpreter's lock.

The engine's libraries are imported at the top of this module: the launcher's template process
imports it once, and every engine process forked from that template shares those pages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

# Imported here, not where used: the launcher's template imports this module once (see the docstring).
import transformers.models.bert.modeling_bert  # noqa: F401  (the encoder architecture the engine builds)

from service import ipc
from service.engine_core import EngineCore
from service.engine_tuning import freeze_startup_objects, tune_allocator
from service.errors import InferenceError, ServiceError
from service.logs import configure_logging
from service.settings import Settings
from service.types import BatchStats

log = logging.getLogger("cogalora.engine")


class _ChannelEvents:
    """Engine events written to the API process (callable from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter, core_queue: Callable[[], int]):
        self.loop = loop
        self.writer = writer
        self.queue_depth = core_queue

    def send(self, message: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.writer.write, ipc.frame(message))

    def on_batch(self, stats: BatchStats) -> None:
        self.send({"op": "batch", "stats": ipc.encode_stats(stats), "queue": self.queue_depth()})

    def on_adapter_loaded(self, name: str, seconds: float) -> None:
        self.send({"op": "loaded", "name": name, "seconds": seconds})

    def on_adapter_evicted(self, name: str) -> None:
        self.send({"op": "evicted", "name": name})


async def serve(socket_path: str) -> int:
    """Connect, build the engine, serve requests until ``stop`` or the socket closes."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    configure = await ipc.read_message(reader)
    settings = Settings(**configure["settings"])
    configure_logging(settings.log_format, settings.log_level)
    if settings.resolved_device() == "cpu":
        tune_allocator()  # before the engine's threads exist, so that they all share one heap
    loop = asyncio.get_running_loop()
    core: EngineCore | None = None
    events = _ChannelEvents(loop, writer, lambda: core.queue_depth if core is not None else 0)
    try:
        core = await asyncio.to_thread(EngineCore.build, settings, events, False)
        await core.start()
    except Exception as exc:
        log.exception("the engine could not start")
        writer.write(ipc.frame({"op": "failed", "reason": str(exc) or type(exc).__name__}))
        await writer.drain()
        writer.close()
        return 1
    freeze_startup_objects()  # the model's modules and what loading made: never walked by the collector again
    # What failed to load at start (weights that cannot be read, or not finite) shows in the API process's
    # listings from the start, not only after a request has asked for it.
    ready = {"loaded": core.repository.loaded_names(), "unavailable": core.repository.failures, "pid": os.getpid()}
    writer.write(ipc.frame({"op": "ready", **ready}))
    tasks: dict[int, asyncio.Task] = {}
    calls: set[asyncio.Task] = set()

    async def classify(message: dict[str, Any]) -> None:
        ident = message["id"]
        try:
            rows = await core.classify(ipc.decode_request(message))
            reply = {"op": "result", "id": ident, "rows": ipc.encode_rows(rows), "queue": core.queue_depth}
        except ServiceError as exc:
            reply = {"op": "error", "id": ident, **ipc.encode_error(exc)}
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("a request failed in the engine")
            reply = {"op": "error", "id": ident, **ipc.encode_error(InferenceError("inference failed"))}
        finally:
            tasks.pop(ident, None)
        writer.write(ipc.frame(reply))

    async def call(message: dict[str, Any]) -> None:
        try:
            value = await asyncio.to_thread(core.call, message["method"], *message["args"])
            reply = {"op": "reply", "id": message["id"], "value": value}
        except ServiceError as exc:
            reply = {"op": "error", "id": message["id"], **ipc.encode_error(exc)}
        except Exception as exc:
            log.exception("engine call %s failed", message["method"])
            reply = {"op": "error", "id": message["id"], **ipc.encode_error(InferenceError(str(exc)[:200]))}
        writer.write(ipc.frame(reply))

    while True:
        try:
            message = await ipc.read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            break  # the API process is gone: nobody is left to answer
        op = message["op"]
        if op == "classify":
            tasks[message["id"]] = asyncio.create_task(classify(message))
        elif op == "cancel":
            task = tasks.pop(message["id"], None)
            if task is not None:
                task.cancel()
        elif op == "call":
            calls.add(task := asyncio.create_task(call(message)))
            task.add_done_callback(calls.discard)
        elif op == "stop":
            break
    await core.stop()
    await asyncio.gather(*tasks.values(), *calls, return_exceptions=True)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()
    return 0


def run(socket_path: str) -> NoReturn:
    """The engine process: serve the API process at ``socket_path`` until it says stop or is gone, then
    exit with the engine's status."""
    # What this process inherited from the launcher's template is never collected: left out of the
    # collector's scans, its pages stay shared with the template instead of being copied here.
    gc.freeze()
    # The API process decides when this one stops (it drains first): a Ctrl-C or SIGTERM sent to the
    # whole process group must not stop the engine under requests it still has to answer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(asyncio.run(serve(socket_path)))


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(
        prog="python -m service.engine_process",
        description="The engine process of `python -m service` (started by it; not meant to be run by hand).",
    )
    parser.add_argument("--socket", required=True, help="the API process's Unix socket")
    run(parser.parse_args(argv).socket)


if __name__ == "__main__":
    main()
