"""The API process's side of the engine process: start it, carry requests to it, restart it when it dies.

:class:`ProcessTransport` starts an engine process (``service.engine_process``, forked by
``service.engine_launcher``), hands it the settings over a Unix socket and then carries requests and
admin calls to it as ``service.ipc`` messages. If the engine process dies, the requests it held are
sent once more to its successor (classification is idempotent); meanwhile new requests get 503
``not_ready`` with ``Retry-After``. A drain (``stop``) waits for the requests in flight, then asks
the engine to finish and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service import ipc
from service.engine_launcher import EngineProcess
from service.errors import NotReadyError, ServiceError
from service.types import RowOutput, TokenizedRequest

log = logging.getLogger("cogalora.engine")

#: Seconds a stopping engine gets to answer its requests and exit before it is killed.
STOP_GRACE_S = 30.0
#: Restarts in a row that may fail before the service gives up (then it exits, and an orchestrator restarts it).
MAX_FAILED_RESTARTS = 3


class EngineStartError(RuntimeError):
    """The engine process could not start (its reason is the message)."""


@dataclass
class _Pending:
    message: dict[str, Any]
    future: asyncio.Future
    retried: bool = False


class ProcessTransport:
    """Starts the engine process, carries requests to it, restarts it when it dies."""

    def __init__(
        self, settings_payload: dict[str, Any], events: Any, on_ready: Callable[[list[str], dict[str, str]], None]
    ) -> None:
        """``settings_payload``: the settings the engine builds from (JSON-ready); ``events``: receives
        ``on_batch``/``on_adapter_loaded``/``on_adapter_evicted``; ``on_ready``: the adapters the engine
        holds whenever it (re)starts, and those it could not load (name -> reason)."""
        self.settings_payload = settings_payload
        self.events = events
        self.on_ready = on_ready
        self.up = False
        self.queue_depth = 0
        self.pid: int | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._folder: Path | None = None
        self._server: asyncio.AbstractServer | None = None
        self._process: EngineProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected: asyncio.Future | None = None
        self._reader_task: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None
        self._stopping = False
        self.restarts = 0

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine process and wait until it is ready (raises ``EngineStartError``)."""
        self._folder = Path(tempfile.mkdtemp(prefix="cogalora-engine-"))  # 0700: only this user connects
        await self._launch()
        self._supervisor = asyncio.create_task(self._supervise(), name="cogalora-engine-supervisor")

    async def _launch(self) -> None:
        assert self._folder is not None
        path = self._folder / f"engine-{next(self._ids)}.sock"
        loop = asyncio.get_running_loop()
        self._connected = loop.create_future()

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self._connected is not None and not self._connected.done():
                self._connected.set_result((reader, writer))
            else:
                writer.close()

        self._server = await asyncio.start_unix_server(accept, path=str(path))
        self._process = EngineProcess(str(path))
        await self._process.start()
        try:
            reader, writer = await self._await_process(self._connected)
            writer.write(ipc.frame({"op": "configure", "settings": self.settings_payload}))
            while True:  # adapters it preloads are reported before it is ready
                message = await self._await_process(asyncio.ensure_future(ipc.read_message(reader)))
                if message["op"] in ("ready", "failed"):
                    break
                self._dispatch(message)
        finally:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if message["op"] != "ready":
            await self._process.wait()
            raise EngineStartError(message.get("reason", "the engine process failed to start"))
        self._writer = writer
        self.pid = message["pid"]
        self.on_ready(message["loaded"], message["unavailable"])
        self._reader_task = asyncio.create_task(self._read(reader), name="cogalora-engine-reader")
        self.up = True

    async def _await_process(self, future: asyncio.Future) -> Any:
        """``future``'s result, or ``EngineStartError`` if the engine process exits first."""
        exited = asyncio.ensure_future(self._process.wait())
        done, _ = await asyncio.wait({future, exited}, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            exited.cancel()
            return future.result()
        future.cancel()
        raise EngineStartError(f"the engine process exited with status {self._process.returncode} while starting")

    async def _supervise(self) -> None:
        """Restart the engine whenever it dies (unless stopping); re-send the requests it held."""
        failures = 0
        while not self._stopping:
            returncode = await self._process.wait()
            self.up = False
            if self._reader_task is not None:
                await asyncio.gather(self._reader_task, return_exceptions=True)
            if self._stopping:
                return
            log.error("the engine process exited (status %s); restarting it", returncode)
            try:
                await self._launch()
            except EngineStartError as exc:
                failures += 1
                log.error("restarting the engine failed (%s)", exc)
                if failures >= MAX_FAILED_RESTARTS:
                    self._fail_pending(NotReadyError("the engine cannot be restarted", retry_after=5.0))
                    os.kill(os.getpid(), signal.SIGTERM)  # an orchestrator restarts the whole service
                    return
                await asyncio.sleep(min(2.0**failures, 10.0))
                continue
            failures = 0
            self.restarts += 1
            self._resend()

    def _resend(self) -> None:
        """Requests the dead engine held: sent once more; those already retried fail with 503."""
        for ident, pending in list(self._pending.items()):
            if pending.future.done():
                continue
            if pending.retried or pending.message["op"] != "classify":
                pending.future.set_exception(
                    NotReadyError("the engine restarted while running this request; retry", retry_after=1.0)
                )
                continue
            pending.retried = True
            self._writer.write(ipc.frame(pending.message))
            log.info("request %d sent again to the restarted engine", ident)

    def _fail_pending(self, error: ServiceError) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)

    async def stop(self) -> None:
        """Wait for the requests in flight, then let the engine finish and exit (killed after a grace)."""
        while self._pending and self.up:
            await asyncio.gather(*(p.future for p in list(self._pending.values())), return_exceptions=True)
        self._stopping = True
        self.up = False
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ConnectionError):
                self._writer.write(ipc.frame({"op": "stop"}))
                await self._writer.drain()
            try:
                await asyncio.wait_for(self._process.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.error("the engine did not stop within %.0f s; killing it", STOP_GRACE_S)
                self._process.kill()
                await self._process.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        self._fail_pending(NotReadyError("the service stopped", retry_after=1.0))
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    # ---- messages -----------------------------------------------------------------------------

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                message = await ipc.read_message(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op in ("result", "error", "reply"):
            pending = self._pending.get(message["id"])
            if pending is None or pending.future.done():
                return
            if op == "result":
                self.queue_depth = message["queue"]
                pending.future.set_result(ipc.decode_rows(message["rows"]))
            elif op == "error":
                pending.future.set_exception(ipc.decode_error(message))
            else:
                pending.future.set_result(message["value"])
        elif op == "batch":
            self.queue_depth = message["queue"]
            self.events.on_batch(ipc.decode_stats(message["stats"]))
        elif op == "loaded":
            self.events.on_adapter_loaded(message["name"], message["seconds"])
        elif op == "evicted":
            self.events.on_adapter_evicted(message["name"])

    async def _request(self, message: dict[str, Any]) -> Any:
        if not self.up:
            raise NotReadyError("the engine is restarting; retry shortly", retry_after=1.0)
        ident = next(self._ids)
        message["id"] = ident
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = _Pending(message, future)
        self._writer.write(ipc.frame(message))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if self.up:
                self._writer.write(ipc.frame({"op": "cancel", "id": ident}))
            raise
        finally:
            self._pending.pop(ident, None)

    async def classify(self, request: TokenizedRequest) -> list[RowOutput]:
        return await self._request({"op": "classify", **ipc.encode_request(request)})

    async def call(self, method: str, *args: Any) -> Any:
        return await self._request({"op": "call", "method": method, "args": list(args)})
