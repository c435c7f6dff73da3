"""Dynamic batcher: ordering, per-request errors, max wait (fake timer), queue limits, unload while queued, drain.

No test sleeps and hopes: the engine blocks on events the test releases, and the batcher's timer
is a fake whose firing the test controls.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from conftest import synthetic_checkpoint
from test_engine import word_level_tokenizer

from service.batcher import Batcher, BatcherConfig
from service.engine import Engine, EngineRun, PreparedRow
from service.errors import (
    AdapterUnloadedError,
    InferenceError,
    PayloadTooLargeError,
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
    UnknownAdapterError,
)
from service.repository import ModelRepository
from service.types import BatchStats, ClassifyRequest, RowResult

pytestmark = pytest.mark.timeout(60)


class FakeEngine:
    """Rows are texts; results echo them. ``boom`` fails its row; ``gate`` blocks batches until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self._next_request = 0
        self.texts: dict[tuple[int, int], str] = {}

    def prepare(self, request: ClassifyRequest) -> list[PreparedRow]:
        if request.adapter != "fake":
            raise UnknownAdapterError(f"adapter {request.adapter!r} is not loaded")
        self._next_request += 1
        rows = []
        for i, text in enumerate(request.texts):
            tokens = tuple(range(len(text.split()) + 2))  # words + [CLS] + [SEP]
            rows.append(PreparedRow("fake", 1, 0, tokens, None, 0.5, self._next_request, i))
            self.texts[(self._next_request, i)] = text
        return rows

    def run_batch(self, rows: list[PreparedRow]) -> EngineRun:
        self.started.set()
        assert self.gate.wait(30), "test never released the engine"
        texts = [self.texts[(row.request_id, row.index)] for row in rows]
        self.batches.append(texts)
        results = [
            InferenceError("inference failed for this input")
            if text == "boom"
            else RowResult(
                label=text,
                score=1.0,
                scores=[{"label": text, "score": 1.0}],
                active_adapters=0,
                total_adapters=0,
                active_modules=[],
                tokens=row.tokens,
                flops={"total": 1, "adapter": 0, "adapter_saved": 0},
            )
            for row, text in zip(rows, texts, strict=True)
        ]
        stats = BatchStats(len(rows), len({r.request_id for r in rows}), 0, 0, {"fake": len(rows)}, 0.0, 0)
        return EngineRun(results=results, stats=[stats])


class FakeTimer:
    """The batcher's injected sleep: records each wait and returns only when the test fires it."""

    def __init__(self) -> None:
        self.requests: list[float] = []
        self.waiting = asyncio.Event()
        self._fire = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.requests.append(seconds)
        self.waiting.set()
        await self._fire.wait()
        self._fire.clear()

    def fire(self) -> None:
        self._fire.set()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Listener:
    def __init__(self) -> None:
        self.stats: list[BatchStats] = []

    def on_batch(self, stats: BatchStats) -> None:
        self.stats.append(stats)


def request(*texts: str) -> ClassifyRequest:
    return ClassifyRequest(texts=list(texts), adapter="fake")


async def started(engine: FakeEngine) -> None:
    assert await asyncio.to_thread(engine.started.wait, 30)


@pytest.fixture
async def parts():
    engine, timer, clock, listener = FakeEngine(), FakeTimer(), FakeClock(), Listener()
    batcher = Batcher(
        engine,
        BatcherConfig(max_batch_size=4, max_batch_tokens=1000, max_wait_s=0.5, max_queue=6, request_timeout_s=30),
        listener,
        clock=clock,
        sleep=timer.sleep,
    )
    await batcher.start()
    yield batcher, engine, timer, clock, listener
    engine.gate.set()
    timer.fire()
    await batcher.stop()


async def test_results_keep_input_order_and_requests_share_a_batch(parts) -> None:
    batcher, engine, timer, _, listener = parts
    first = asyncio.create_task(batcher.submit(request("a", "b c", "d e f")))
    second = asyncio.create_task(batcher.submit(request("g")))
    assert [r.label for r in await first] == ["a", "b c", "d e f"]
    assert [r.label for r in await second] == ["g"]
    assert engine.batches == [["a", "b c", "d e f", "g"]], "four rows fill one batch of max_batch_size 4"
    assert listener.stats[0].rows == 4 and listener.stats[0].requests == 2
    assert timer.requests == [], "a full batch never waits"


async def test_one_bad_request_does_not_fail_its_batch_mates(parts) -> None:
    batcher, engine, *_ = parts
    tasks = [asyncio.create_task(batcher.submit(request(text))) for text in ("ok1", "boom", "ok2", "ok3")]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(engine.batches) == 1
    assert [r[0].label for r in (outcomes[0], outcomes[2], outcomes[3])] == ["ok1", "ok2", "ok3"]
    assert isinstance(outcomes[1], InferenceError)


async def test_max_wait_closes_a_partial_batch_only_when_the_timer_fires(parts) -> None:
    batcher, engine, timer, clock, _ = parts
    task = asyncio.create_task(batcher.submit(request("lonely")))
    await timer.waiting.wait()
    assert timer.requests == [pytest.approx(0.5)], "waits max_wait_s from the row's arrival"
    assert engine.batches == [] and batcher.queue_depth == 1 and batcher.inflight == 1
    clock.now += 0.5
    timer.fire()
    assert [r.label for r in await task] == ["lonely"]
    assert engine.batches == [["lonely"]]
    assert batcher.queue_depth == 0 and batcher.inflight == 0


async def test_late_arrivals_join_the_waiting_batch(parts) -> None:
    batcher, engine, timer, clock, _ = parts
    first = asyncio.create_task(batcher.submit(request("a")))
    await timer.waiting.wait()
    timer.waiting.clear()
    clock.now += 0.3
    second = asyncio.create_task(batcher.submit(request("b")))
    await timer.waiting.wait()  # woken by the arrival, still not full: waits again for the oldest row
    assert timer.requests[-1] == pytest.approx(0.2)
    clock.now += 0.2
    timer.fire()
    await asyncio.gather(first, second)
    assert engine.batches == [["a", "b"]]


async def test_token_budget_closes_a_batch() -> None:
    engine = FakeEngine()
    timer = FakeTimer()
    config = BatcherConfig(max_batch_size=100, max_batch_tokens=8, max_wait_s=10, max_queue=100)
    batcher = Batcher(engine, config, clock=FakeClock(), sleep=timer.sleep)
    await batcher.start()
    try:
        # "x y" is 4 tokens with its special tokens: two of them make 8, the budget.
        results = await asyncio.gather(*(batcher.submit(request("x y")) for _ in range(2)))
        assert len(results) == 2 and engine.batches == [["x y", "x y"]]
    finally:
        await batcher.stop()


async def test_queue_full_is_refused_immediately(parts) -> None:
    batcher, engine, *_ = parts
    engine.gate.clear()
    running = asyncio.create_task(batcher.submit(request("a", "b", "c", "d")))
    await started(engine)  # the first batch is running and blocks the worker
    queued = asyncio.create_task(batcher.submit(request("e", "f", "g", "h")))
    while batcher.queue_depth < 4:
        await asyncio.sleep(0)
    with pytest.raises(QueueFullError) as refused:
        await batcher.submit(request("i", "j", "k"))  # 4 + 3 > max_queue 6
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    with pytest.raises(PayloadTooLargeError):
        await batcher.submit(request(*"abcdefg"))  # more rows than the whole queue holds
    assert batcher.inflight == 2
    engine.gate.set()
    assert len(await running) == 4 and len(await queued) == 4


async def test_timeout(parts) -> None:
    _, engine, *_ = parts
    engine.gate.clear()
    short = Batcher(engine, BatcherConfig(max_batch_size=1, max_wait_s=0, request_timeout_s=0.05))
    await short.start()
    try:
        with pytest.raises(RequestTimeoutError):
            await short.submit(request("stuck"))  # the engine is blocked: it cannot answer in time
        assert short.inflight == 0
    finally:
        engine.gate.set()
        await short.stop()


async def test_stop_drains_accepted_requests_and_refuses_new_ones(parts) -> None:
    batcher, engine, timer, *_ = parts
    engine.gate.clear()
    first = asyncio.create_task(batcher.submit(request("a", "b", "c", "d")))
    await started(engine)
    waiting = [asyncio.create_task(batcher.submit(request(text))) for text in ("e", "f")]
    while batcher.queue_depth < 2:
        await asyncio.sleep(0)
    stopping = asyncio.create_task(batcher.stop())
    while not batcher._stopping:
        await asyncio.sleep(0)
    with pytest.raises(ShuttingDownError):
        await batcher.submit(request("late"))
    engine.gate.set()
    await stopping
    assert len(await first) == 4
    assert [(await task)[0].label for task in waiting] == ["e", "f"], "drained without waiting for max_wait"
    assert timer.requests == []
    assert batcher.inflight == 0 and batcher.queue_depth == 0


async def test_unknown_adapter_is_rejected_at_submit(parts) -> None:
    batcher, *_ = parts
    with pytest.raises(UnknownAdapterError):
        await batcher.submit(ClassifyRequest(texts=["x"], adapter="nope"))
    assert batcher.inflight == 0


# ---- with the real engine ------------------------------------------------------------------------


@pytest.fixture
def tiny_repository(tmp_path: Path, tiny_base_dir: Path) -> ModelRepository:
    word_level_tokenizer(tiny_base_dir)
    synthetic_checkpoint(tmp_path / "models" / "keep", str(tiny_base_dir), ["neg", "pos"], seed=0)
    synthetic_checkpoint(tmp_path / "models" / "drop", str(tiny_base_dir), ["x", "y", "z"], seed=2)
    repository = ModelRepository(tmp_path / "models")
    assert repository.load_all() == {}
    return repository


async def test_adapter_removed_while_queued(tiny_repository: ModelRepository) -> None:
    timer = FakeTimer()
    listener = Listener()
    engine = Engine(tiny_repository, tune_malloc=False)
    clock = FakeClock()
    config = BatcherConfig(max_batch_size=8, max_wait_s=1)
    batcher = Batcher(engine, config, listener, clock=clock, sleep=timer.sleep)
    await batcher.start()
    try:
        doomed = asyncio.create_task(batcher.submit(ClassifyRequest(texts=["good movie"], adapter="drop")))
        kept = asyncio.create_task(batcher.submit(ClassifyRequest(texts=["bad plot", "the"], adapter="keep")))
        await timer.waiting.wait()
        assert batcher.queue_depth == 3
        await asyncio.to_thread(tiny_repository.unload, "drop")
        clock.now += 1
        timer.fire()
        with pytest.raises(AdapterUnloadedError):
            await doomed
        results = await kept
        assert [len(r.scores) for r in results] == [2, 2]
        assert listener.stats[-1].adapters == {"keep": 2}
    finally:
        timer.fire()
        await batcher.stop()


async def test_real_engine_results_match_direct_engine_runs(tiny_repository: ModelRepository) -> None:
    engine = Engine(tiny_repository, tune_malloc=False)
    batcher = Batcher(engine, BatcherConfig(max_batch_size=16, max_wait_s=0.001))
    requests = [
        ClassifyRequest(texts=["good movie", "the plot w3 w7 w11"], adapter="keep"),
        ClassifyRequest(texts=["awful"], adapter="drop", threshold=0.2),
        ClassifyRequest(texts=["bad bad bad plot the movie"], adapter="keep", threshold=0.9),
    ]
    await batcher.start()
    try:
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
    finally:
        await batcher.stop()
    for req, answer in zip(requests, answers, strict=True):
        direct = engine.run(engine.prepare(req))
        assert [a.active_modules for a in answer] == [d.active_modules for d in direct]
        assert [a.score for a in answer] == pytest.approx([d.score for d in direct], abs=1e-5)
