"""The engine as the API process sees it: admission, tokenization, and the engine's numbers named.

:class:`EngineClient` is what the routes submit to (``Service.batcher``). It admits a request (rows
in flight), tokenizes it on a worker thread, hands the token ids to a transport and turns the
engine's :class:`~service.types.RowOutput` into wire results with the catalogue's label and site
names. Two transports:

- :class:`LocalTransport`: the engine (``service.engine_core.EngineCore``) in this process
  (``engine_process=false``, tests, each Ray Serve replica);
- :class:`~service.process_transport.ProcessTransport`: the engine in its own process, so that the
  forward never shares an interpreter (and its GIL) with HTTP, JSON and tokenization.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from cogalora.architectures import site_names
from service.catalogue import Catalogue, CatalogueEntry, CatalogueReads, failure_reason
from service.engine_core import EngineCore
from service.errors import AdapterLoadError, AdapterReplacedError, NotReadyError, QueueFullError, RequestTimeoutError
from service.results import row_result
from service.schemas import RowResult
from service.settings import Settings
from service.tokenization import Tokenizers
from service.types import AdapterDescription, ClassifyRequest, RowOutput, TokenizedRequest


class Transport(Protocol):
    """How token ids reach an engine and its numbers come back."""

    @property
    def up(self) -> bool: ...
    @property
    def queue_depth(self) -> int: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def classify(self, request: TokenizedRequest) -> list[RowOutput]: ...
    async def call(self, method: str, *args: Any) -> Any: ...


class LocalTransport:
    """The engine in this process."""

    up = True

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    @property
    def queue_depth(self) -> int:
        return self.core.queue_depth

    async def start(self) -> None:
        await self.core.start()

    async def stop(self) -> None:
        await self.core.stop()

    async def classify(self, request: TokenizedRequest) -> list[RowOutput]:
        return await self.core.classify(request)

    async def call(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(self.core.call, method, *args)


class EngineClient:
    """Admission, tokenization and naming in front of a :class:`Transport` (the service's batcher)."""

    def __init__(self, settings: Settings, catalogue: Catalogue, transport: Transport) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.transport = transport
        self.tokenizers = Tokenizers()
        self._in_flight = 0
        self._tokenizing = 0
        self._tokenizer_thread: ThreadPoolExecutor | None = None
        # Rows the engine may hold at once: its queue and the batch it runs.
        self._capacity = settings.max_queue + settings.max_batch_size

    @property
    def ready(self) -> bool:
        return self.transport.up

    @property
    def queue_depth(self) -> int:
        """Rows admitted and not running: being tokenized here, or queued in the engine."""
        return self._tokenizing + self.transport.queue_depth

    async def start(self) -> None:
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cogalora-tokenize")
        await self.transport.start()

    async def stop(self) -> None:
        """The engine answers every admitted request, then stops."""
        await self.transport.stop()
        if self._tokenizer_thread is not None:
            self._tokenizer_thread.shutdown(wait=True)

    async def submit(self, request: ClassifyRequest) -> list[RowResult]:
        """Results in input order; raises the ServiceError of the first failing input."""
        settings = self.settings
        if not self.transport.up:
            raise NotReadyError("the engine is restarting; retry shortly", retry_after=settings.retry_after_s)
        count = len(request.texts)
        if self._in_flight + count > self._capacity:
            raise QueueFullError(
                f"queue full ({self._in_flight} inputs in flight); retry later", retry_after=settings.retry_after_s
            )
        entry = self.catalogue.entry(request.adapter)
        self._in_flight += count
        try:
            async with asyncio.timeout(settings.request_timeout_s):
                try:
                    outputs, tokenize_seconds = await self._classify(entry, request)
                except AdapterReplacedError:
                    # Replaced after this entry was read: read the folder again (off the event loop),
                    # tokenize for it, once.
                    entry = await asyncio.to_thread(self.catalogue.add, entry.name)
                    outputs, tokenize_seconds = await self._classify(entry, request)
        except AdapterLoadError as exc:  # the engine could not load it: later requests fail fast here
            self.catalogue.mark_failed(entry.name, failure_reason(entry.name, exc))
            raise
        except TimeoutError:
            raise RequestTimeoutError(
                f"no answer within {settings.request_timeout_s:g} s; the service is overloaded, retry later"
            ) from None
        finally:
            self._in_flight -= count
        # A shared encoder carries every module kind: its sites are every site of the base model.
        description, sites = entry.description, site_names(entry.spec.num_layers)
        results = [row_result(output, description.labels, sites, description.total_adapters) for output in outputs]
        for result in results:
            result.tokenize_seconds = tokenize_seconds
        return results

    async def _classify(self, entry: CatalogueEntry, request: ClassifyRequest) -> tuple[list[RowOutput], float]:
        """The engine's outputs for ``request`` tokenized for ``entry``, and the seconds tokenizing took."""
        count = len(request.texts)
        began = time.perf_counter()
        self._tokenizing += count
        arguments = (entry.meta.base_model, list(request.texts), entry.description.max_length, request.truncate)
        try:
            tokenized = self.tokenizers.tokenize_now(*arguments, entry.name)
            if tokenized is None:
                tokenized = await asyncio.get_running_loop().run_in_executor(
                    self._tokenizer_thread, self.tokenizers.tokenize, *arguments, entry.name
                )
            ids, input_tokens = tokenized
        finally:
            self._tokenizing -= count
        tokenize_seconds = time.perf_counter() - began
        tokenized = TokenizedRequest(entry.name, ids, input_tokens, request.threshold, request.client, entry.revision)
        return await self.transport.classify(tokenized), tokenize_seconds


class RemoteRepository(CatalogueReads):
    """The resident adapters as the API process sees them when the engine runs in its own process.

    Its own :class:`~service.catalogue.Catalogue` (the same scan as the engine's) answers names and
    metadata; which adapters are loaded comes from the engine's events; admin changes (``load``,
    ``unload``) are calls to the engine. Those two are blocking: routes call them on worker threads.
    """

    def __init__(self, catalogue: Catalogue, max_loaded: int, listener: Any) -> None:
        self.catalogue = catalogue
        self.max_loaded = max_loaded
        self.listener = listener
        self._loaded: dict[str, None] = {}
        self._transport: Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, transport: Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop

    # ---- what the engine reports --------------------------------------------------------------

    def on_ready(self, loaded: list[str], unavailable: dict[str, str]) -> None:
        """The engine (re)started holding ``loaded``; the adapters in ``unavailable`` failed to load there."""
        self._loaded = dict.fromkeys(loaded)
        for name, reason in unavailable.items():
            self.catalogue.mark_failed(name, reason)

    def on_batch(self, stats) -> None:
        self.listener.on_batch(stats)

    def on_adapter_loaded(self, name: str, seconds: float) -> None:
        self._loaded[name] = None
        self.listener.on_adapter_loaded(name, seconds)

    def on_adapter_evicted(self, name: str) -> None:
        self._loaded.pop(name, None)
        self.listener.on_adapter_evicted(name)

    # ---- reading ------------------------------------------------------------------------------

    def loaded_names(self) -> list[str]:
        return list(self._loaded)

    # ---- admin (blocking) ---------------------------------------------------------------------

    def load(self, name: str, replace: bool = False) -> AdapterDescription:
        self.catalogue.folder(name)
        try:
            self._call("load", name, replace)
        except AdapterLoadError as exc:
            self.catalogue.mark_failed(name, failure_reason(name, exc))
            raise
        self.catalogue.add(name)
        self._loaded[name] = None
        return self.info(name)

    def unload(self, name: str) -> None:
        self._call("unload", name)
        self.catalogue.remove(name)
        self._loaded.pop(name, None)

    def _call(self, method: str, *args: Any) -> Any:
        assert self._transport is not None and self._loop is not None, "attach() the transport first"
        return asyncio.run_coroutine_threadsafe(self._transport.call(method, *args), self._loop).result()
