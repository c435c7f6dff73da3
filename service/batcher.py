"""Dynamic batching on asyncio: collect rows from many requests, run them as one engine batch off the loop.

A batch closes when it holds ``max_batch_size`` rows, or ``max_batch_tokens`` tokens, or when its
oldest row has waited ``max_wait_s``, or at once while stopping. Rows are taken first in, first out
(a request larger than a batch spans several); the engine sorts each batch by length and cuts it
into length chunks. Inference runs on one worker thread, so the event loop keeps accepting requests
while a batch runs. The clock and the timer are injectable so tests drive ``max_wait_s`` by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.engine import Engine, EngineRun, PreparedRow
from service.errors import (
    InferenceError,
    PayloadTooLargeError,
    QueueFullError,
    RequestTimeoutError,
    ServiceError,
    ShuttingDownError,
)
from service.types import BatchListener, ClassifyRequest, RowResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 32
    """Rows per engine batch."""
    max_batch_tokens: int = 8192
    """Real (unpadded) tokens per engine batch; a single longer row still runs, alone."""
    max_wait_s: float = 0.005
    """How long the oldest queued row may wait for batch-mates."""
    max_queue: int = 1024
    """Rows waiting (not yet running) before new requests are refused with QueueFullError."""
    request_timeout_s: float = 30.0
    """From submit to answer; RequestTimeoutError after that."""

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"BatcherConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_s < 0:
            raise ValueError(f"BatcherConfig.max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"BatcherConfig.request_timeout_s must be > 0, got {self.request_timeout_s}")


@dataclass(eq=False)
class _Pending:
    """One accepted request: its rows, how many are still queued, its answers so far."""

    rows: list[PreparedRow]
    future: asyncio.Future
    enqueued_at: float
    next_row: int = 0
    """Rows before this index have been taken into a batch."""
    results: list[RowResult | ServiceError | None] = field(default_factory=list)
    remaining: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.rows)
        self.remaining = len(self.rows)


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
        self.config = config or BatcherConfig()
        self.listener = listener
        self._clock = clock
        self._sleep = sleep
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._inflight = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._rows_per_second = 0.0

    # ---- state --------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Rows accepted and waiting for a batch."""
        return self._queued_rows

    @property
    def inflight(self) -> int:
        """Requests accepted and not yet answered (queued or running)."""
        return self._inflight

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cogalora-engine")
        self._task = asyncio.create_task(self._schedule(), name="cogalora-batcher")

    async def stop(self) -> None:
        """Refuse new requests, answer every accepted one, then stop the worker."""
        self._stopping = True
        if self._task is None:
            return
        self._poke()
        try:
            await self._task
        finally:
            self._task = None
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    # ---- requests -----------------------------------------------------------------------------

    async def submit(self, request: ClassifyRequest) -> list[RowResult]:
        """Results in input order; raises the ServiceError of the first failing input."""
        if self._stopping or not self.running:
            raise ShuttingDownError("the service is shutting down; retry on another instance", retry_after=1.0)
        rows = self.engine.prepare(request)
        config = self.config
        if len(rows) > config.max_queue:
            raise PayloadTooLargeError(f"{len(rows)} inputs exceed the queue capacity of {config.max_queue} inputs")
        if self._queued_rows + len(rows) > config.max_queue:
            raise QueueFullError(
                f"queue full ({self._queued_rows} inputs waiting); retry later", retry_after=self._retry_after()
            )
        pending = _Pending(rows=rows, future=asyncio.get_running_loop().create_future(), enqueued_at=self._clock())
        self._queue.append(pending)
        self._queued_rows += len(rows)
        self._inflight += 1
        self._poke()
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), config.request_timeout_s)
        except TimeoutError:
            self._withdraw(pending)
            raise RequestTimeoutError(
                f"no answer within {config.request_timeout_s:g} s; the service is overloaded, retry later"
            ) from None
        except asyncio.CancelledError:
            self._withdraw(pending)
            raise
        finally:
            self._inflight -= 1

    def _retry_after(self) -> float:
        if self._rows_per_second <= 0:
            return 1.0
        return max(1.0, self._queued_rows / self._rows_per_second)

    def _withdraw(self, pending: _Pending) -> None:
        """Drop a request nobody waits for any more: its queued rows are not run."""
        if not pending.future.done():
            pending.future.cancel()
        if pending in self._queue:
            self._queue.remove(pending)
            self._queued_rows -= len(pending.rows) - pending.next_row

    def _poke(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # ---- scheduling ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            self._wakeup.clear()
            if not self._queue:
                if self._stopping:
                    return
                await self._wakeup.wait()
                continue
            wait = self._time_to_close()
            if wait > 0:
                await self._wait(wait)
                continue
            taken = self._take_batch()
            await self._execute(loop, taken)

    def _time_to_close(self) -> float:
        """Seconds until the current batch must close; 0 when it is full or we are draining."""
        if self._stopping:
            return 0.0
        config = self.config
        rows = tokens = 0
        for pending in self._queue:
            for row in pending.rows[pending.next_row :]:
                rows += 1
                tokens += row.tokens
                if rows >= config.max_batch_size or tokens >= config.max_batch_tokens:
                    return 0.0
        return self._queue[0].enqueued_at + config.max_wait_s - self._clock()

    async def _wait(self, seconds: float) -> None:
        """Until ``seconds`` pass (the injected sleep) or something is queued or stopping."""
        assert self._wakeup is not None
        timer = asyncio.ensure_future(self._sleep(seconds))
        woken = asyncio.ensure_future(self._wakeup.wait())
        try:
            await asyncio.wait({timer, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (timer, woken):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(timer, woken, return_exceptions=True)

    def _take_batch(self) -> list[tuple[_Pending, int, PreparedRow]]:
        config = self.config
        taken: list[tuple[_Pending, int, PreparedRow]] = []
        tokens = 0
        while self._queue:
            pending = self._queue[0]
            while pending.next_row < len(pending.rows):
                row = pending.rows[pending.next_row]
                if taken and (len(taken) >= config.max_batch_size or tokens + row.tokens > config.max_batch_tokens):
                    return taken
                taken.append((pending, pending.next_row, row))
                tokens += row.tokens
                pending.next_row += 1
                self._queued_rows -= 1
            self._queue.popleft()
        return taken

    async def _execute(self, loop: asyncio.AbstractEventLoop, taken: list[tuple[_Pending, int, PreparedRow]]) -> None:
        rows = [row for _, _, row in taken]
        now = self._clock()
        began = time.perf_counter()
        try:
            outcome: EngineRun = await loop.run_in_executor(self._executor, self.engine.run_batch, rows)
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
            if isinstance(result, RowResult):
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
