"""Dynamic batching on asyncio: admit, pin the adapter, queue, batch, run.

``submit`` takes tokenized requests (the API process tokenizes) and follows the order of
text-embeddings-inference's router: *admission* first (a request that would overflow the queue is
refused at once, before any work), then the adapter is pinned (loaded on demand by a worker
thread; other traffic keeps flowing), then the rows are queued. A batch closes when it holds
``max_batch_size`` rows, or when its padded size (rows x longest row) would pass
``max_batch_tokens``, or when its oldest row has waited ``max_wait_s``, or at once while stopping.
The engine sorts each batch by length and cuts it into length chunks.

Fair between clients (``service.fair_queue``): batches take one row of each client in turn. When the
queue is full, a new request of a client that holds less of it than the client holding most would
displace that client's newest waiting request (answered 503 ``queue_full``), rather than being
refused: longest queue drop. With one client this is plain first in, first out with a bounded queue.
A request larger than a batch spans several.

Inference runs on worker threads, one per lane of the engine (copies of the model; see
``service.encoders.Lanes``), so the event loop keeps accepting requests while batches run, and a
batch closes whenever a lane is free.
The clock and the timer are injectable so tests drive ``max_wait_s`` by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from service.engine import Engine, EngineRun
from service.errors import (
    AdapterReplacedError,
    InferenceError,
    PayloadTooLargeError,
    QueueFullError,
    RequestTimeoutError,
    ServiceError,
    ShuttingDownError,
)
from service.fair_queue import FairQueue, Pending, TakenRow
from service.repository import LoadedAdapter
from service.types import BatchListener, RowOutput, TokenizedRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 32
    """Rows per engine batch."""
    max_batch_tokens: int = 8192
    """Padded tokens per engine batch (rows x longest row, what the engine runs at most); a single
    longer row still runs, alone."""
    max_wait_s: float = 0.005
    """How long the oldest queued row may wait for batch-mates."""
    max_queue: int = 1024
    """Rows admitted and not yet running before new requests are refused with QueueFullError."""
    request_timeout_s: float = 30.0
    """From submit to answer (loading, queueing, running); RequestTimeoutError after that."""
    idle_release_s: float | None = 0.5
    """After this long without a batch the engine gives its free memory back to the OS, once; None: never."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"BatcherConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_s < 0:
            raise ValueError(f"BatcherConfig.max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"BatcherConfig.request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.idle_release_s is not None and self.idle_release_s < 0:
            raise ValueError(f"BatcherConfig.idle_release_s must be >= 0 or None, got {self.idle_release_s}")


Sleep = Callable[[float], Awaitable[None]]


class Batcher:
    """Asyncio front of an :class:`~service.engine.Engine`: ``await submit(request)`` -> results."""

    def __init__(
        self,
        engine: Engine,
        config: BatcherConfig | None = None,
        listener: BatchListener | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.engine = engine
        self.repository = engine.repository
        self.config = config or BatcherConfig()
        self.listener = listener
        self._clock = clock
        self._sleep = sleep
        self._queue = FairQueue()
        self._admitted_rows = 0
        """Rows of requests admitted but not queued yet (pinning or tokenizing)."""
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._engine_thread: ThreadPoolExecutor | None = None
        self._lanes = getattr(engine, "lanes", 1)
        """Batches that may run at once (the engine's lanes: copies of the model on their own threads)."""
        self._loader_threads: ThreadPoolExecutor | None = None
        self._stopping = False
        self._rows_per_second = 0.0
        self._release_memory = getattr(engine, "release_memory", None)
        self._ran_since_release = False  # a batch ran since the engine last gave its free memory back

    # ---- state --------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Rows admitted and not running yet (including those whose adapter is being pinned)."""
        return self._queue.queued_rows + self._admitted_rows

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch."""
        return self._queue.queued_rows

    @property
    def stopping(self) -> bool:
        """True from the moment ``stop`` is called: new requests are refused."""
        return self._stopping

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        self._wakeup = asyncio.Event()
        self._engine_thread = ThreadPoolExecutor(max_workers=self._lanes, thread_name_prefix="cogalora-engine")
        self._loader_threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cogalora-load")
        self._task = asyncio.create_task(self._schedule(), name="cogalora-batcher")

    async def stop(self) -> None:
        """Refuse new requests, answer every admitted one, then stop the workers."""
        self._stopping = True
        if self._task is None:
            return
        self._poke()
        try:
            await self._task
        finally:
            self._task = None
            for pool in (self._engine_thread, self._loader_threads):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._engine_thread = self._loader_threads = None

    # ---- requests -----------------------------------------------------------------------------

    async def submit(self, request: TokenizedRequest) -> list[RowOutput]:
        """Results in input order; raises the ServiceError of the first failing input."""
        if self._stopping or not self.running:
            raise ShuttingDownError("the service is shutting down; retry on another instance", retry_after=1.0)
        count = len(request.ids)
        client = request.client
        config = self.config
        if count > config.max_queue:
            raise PayloadTooLargeError(f"{count} inputs exceed the queue capacity of {config.max_queue} inputs")
        self._make_room(client, count)
        self._admitted_rows += count
        self._queue.hold(client, count)
        admitted = True
        adapter: LoadedAdapter | None = None
        pending: Pending | None = None
        try:
            async with asyncio.timeout(config.request_timeout_s):
                adapter = await self._pin(request.adapter, request.revision, config.request_timeout_s)
                if request.revision and adapter.revision != request.revision:
                    raise AdapterReplacedError(
                        f"adapter {request.adapter!r} was replaced while the request was prepared; retry",
                        retry_after=1.0,
                    )
                rows = self.engine.prepare(adapter, request.ids, request.input_tokens, request.threshold)
                future = asyncio.get_running_loop().create_future()
                pending = Pending(rows, future, self._clock(), client=client)
                self._admitted_rows -= count
                admitted = False
                self._queue.push(pending)
                self._poke()
                return await asyncio.shield(future)
        except TimeoutError:
            raise RequestTimeoutError(
                f"no answer within {config.request_timeout_s:g} s; the service is overloaded, retry later"
            ) from None
        finally:
            if admitted:
                self._admitted_rows -= count
                self._queue.forget(client, count)
            if pending is not None:
                if not pending.future.done():
                    pending.future.cancel()
                self._queue.withdraw(pending)  # answered or abandoned: its still-queued rows are not run
            if adapter is not None:
                self.repository.release(adapter)
            self._poke()

    async def _pin(self, name: str, revision: str, timeout: float) -> LoadedAdapter:
        """Pin the adapter: at once when it is loaded, else by a loader thread (loading it)."""
        adapter = self.repository.try_acquire(name, revision)
        if adapter is not None:
            return adapter
        job: Future = self._loader_threads.submit(self.repository.acquire, name, timeout)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # Nobody will use the pin the loader thread is still taking: give it back when it comes.
            job.add_done_callback(lambda done: done.exception() is None and self.repository.release(done.result()))
            raise

    def _retry_after(self) -> float:
        if self._rows_per_second <= 0:
            return 1.0
        return max(1.0, self.queue_depth / self._rows_per_second)

    def _make_room(self, client: str, count: int) -> None:
        """Admit ``count`` rows of ``client``, displacing requests of the client holding most (else QueueFullError)."""
        while self.queue_depth + count > self.config.max_queue:
            victim = self._queue.displaceable(client, count)
            if victim is None:
                raise QueueFullError(
                    f"queue full ({self.queue_depth} inputs waiting); retry later", retry_after=self._retry_after()
                )
            self._queue.unqueue(victim)
            victim.future.set_exception(
                QueueFullError(
                    "queue full: this client held the largest share of the queue and other clients needed room; "
                    "retry later",
                    retry_after=self._retry_after(),
                )
            )

    def _poke(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # ---- scheduling ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        running: set[asyncio.Task] = set()
        while True:
            self._wakeup.clear()
            if not self._queue:
                if self._stopping and self._admitted_rows == 0:
                    break
                idle = self.config.idle_release_s
                if running or not self._ran_since_release or idle is None or self._release_memory is None:
                    await self._wakeup.wait()
                elif not await self._wait(idle):  # idle: the engine gives its free memory back (milliseconds)
                    self._ran_since_release = False
                    try:
                        await loop.run_in_executor(self._engine_thread, self._release_memory)
                    except Exception:
                        logger.exception("releasing free memory failed")
                continue
            if len(running) == self._lanes:  # every lane runs a batch: rows keep queueing for the next one
                await self._wakeup.wait()
                continue
            wait = self._time_to_close()
            if wait > 0:
                await self._wait(wait)
                continue
            # The rows waiting are shared among the idle lanes: closed-loop clients that all wait on one
            # full batch would otherwise leave the other lanes idle.
            idle = self._lanes - len(running)
            batch = self._queue.take_batch(self._fits, max(1, -(-self._queue.queued_rows // idle)))
            if not batch:
                continue
            task = loop.create_task(self._execute(loop, batch))
            running.add(task)
            task.add_done_callback(lambda done: (running.discard(done), self._poke()))
        await asyncio.gather(*running)

    def _fits(self, rows: int, longest: int) -> bool:
        return rows <= self.config.max_batch_size and rows * longest <= self.config.max_batch_tokens

    def _time_to_close(self) -> float:
        """Seconds until the current batch must close; 0 when it is full or we are draining."""
        if self._stopping:
            return 0.0
        config = self.config
        rows = longest = 0
        for _, _, row in self._queue.take_order():
            if rows and not self._fits(rows + 1, max(longest, row.tokens)):
                return 0.0  # the next row does not fit: the batch is as full as it gets
            rows, longest = rows + 1, max(longest, row.tokens)
            if rows >= config.max_batch_size or rows * longest >= config.max_batch_tokens:
                return 0.0
        return self._queue.oldest() + config.max_wait_s - self._clock()

    async def _wait(self, seconds: float) -> bool:
        """Until ``seconds`` pass (the injected sleep: False) or something is queued or stopping (True)."""
        assert self._wakeup is not None
        timer = asyncio.ensure_future(self._sleep(seconds))
        woken = asyncio.ensure_future(self._wakeup.wait())
        try:
            await asyncio.wait({timer, woken}, return_when=asyncio.FIRST_COMPLETED)
            return woken.done()
        finally:
            for task in (timer, woken):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(timer, woken, return_exceptions=True)

    async def _execute(self, loop: asyncio.AbstractEventLoop, taken: list[TakenRow]) -> None:
        self._ran_since_release = True
        rows = [row for _, _, row in taken]
        now = self._clock()
        began = time.perf_counter()
        try:
            outcome: EngineRun | None = await loop.run_in_executor(self._engine_thread, self.engine.run_batch, rows)
            results: list = outcome.results
        except Exception:
            logger.exception("engine batch of %d rows failed", len(rows))
            outcome = None
            results = [InferenceError("inference failed for this input")] * len(rows)
        elapsed = time.perf_counter() - began
        if elapsed > 0:
            rate = len(rows) / elapsed
            self._rows_per_second = rate if self._rows_per_second == 0 else 0.8 * self._rows_per_second + 0.2 * rate
        for (pending, index, _), result in zip(taken, results, strict=True):
            if isinstance(result, RowOutput):
                result.queue_seconds = max(0.0, now - pending.enqueued_at)
            pending.results[index] = result
            pending.remaining -= 1
            if pending.remaining == 0 and not pending.future.done():
                errors = [r for r in pending.results if isinstance(r, ServiceError)]
                if errors:
                    pending.future.set_exception(errors[0])
                else:
                    pending.future.set_result(list(pending.results))
        if outcome is not None and self.listener is not None:
            for stats in outcome.stats:
                try:
                    self.listener.on_batch(stats)
                except Exception:
                    logger.exception("batch listener failed")
