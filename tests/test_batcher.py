"""Dynamic batcher: ordering, per-request errors, max wait (fake timer), queue limits, unload while queued, drain.

No test sleeps and hopes: the engine blocks on events the test releases, and the batcher's timer
is a fake whose firing the test controls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import synthetic_checkpoint

from service.batcher import Batcher, BatcherConfig
from service.engine import Engine, EngineRun, PreparedRow
from service.errors import (
    AdapterReplacedError,
    AdapterUnloadedError,
    InferenceError,
    PayloadTooLargeError,
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
    UnknownAdapterError,
)
from service.repository import ModelRepository
from service.types import BatchStats, ClassifyRequest, RowOutput, TokenizedRequest

pytestmark = pytest.mark.timeout(60)


class FakeRepository:
    """One adapter, "fake"; counts pins so tests can check every pin is given back."""

    def __init__(self) -> None:
        self.adapter = SimpleNamespace(name="fake", revision="r1")
        self.pins = 0
        self.unloaded = False

    def try_acquire(self, name: str, revision: str = ""):
        if name != "fake":
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        self.pins += 1
        return self.adapter

    def acquire(self, name: str, timeout: float | None = None):
        return self.try_acquire(name)

    def release(self, adapter) -> None:
        self.pins -= 1


@dataclass
class Echo(RowOutput):
    """A fake engine's answer: the row's text as its label."""

    label: str = ""


class FakeEngine:
    """Rows are texts; results echo them. ``boom`` fails its row; ``gate`` blocks batches until released."""

    def __init__(self) -> None:
        self.repository = FakeRepository()
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def prepare(self, adapter, ids: list[list], input_tokens: list[int], tau: float | None) -> list[PreparedRow]:
        return [PreparedRow(adapter, row, 0.5, count) for row, count in zip(ids, input_tokens, strict=True)]

    def run_batch(self, rows: list[PreparedRow]) -> EngineRun:
        self.started.set()
        assert self.gate.wait(30), "test never released the engine"
        texts = [row.input_ids[0] for row in rows]
        self.batches.append(texts)
        results = [
            InferenceError("inference failed for this input")
            if text == "boom"
            else Echo([1.0], [0.0], [], [], (1, 0, 0), row.tokens, row.input_tokens, label=text)
            for row, text in zip(rows, texts, strict=True)
        ]
        stats = BatchStats(len(rows), 1, len(rows) * max(r.tokens for r in rows), sum(r.tokens for r in rows), 0.0, 0)
        return EngineRun(results=results, stats=[stats])


class FakeTimer:
    """The batcher's injected sleep: records each wait and returns only when the test fires it."""

    def __init__(self) -> None:
        self.requests: list[float] = []
        self.fired = 0
        self.waiting = asyncio.Event()
        self._fire = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.requests.append(seconds)
        self.waiting.set()
        await self._fire.wait()
        self._fire.clear()

    def fire(self) -> None:
        self.fired += 1
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


def request(*texts: str) -> TokenizedRequest:
    """Words + [CLS] + [SEP] tokens per text; the text itself rides along in place of token ids."""
    ids = [[text] * (len(text.split()) + 2) for text in texts]
    return TokenizedRequest(adapter="fake", ids=ids, input_tokens=[len(row) for row in ids])


def tokenized(engine: Engine, request: ClassifyRequest) -> TokenizedRequest:
    """A real request as the API process hands it to the engine process."""
    adapter = engine.repository.acquire(request.adapter)
    engine.repository.release(adapter)
    rows = engine.tokenize(adapter, list(request.texts), request.truncate)
    return TokenizedRequest(
        request.adapter, [r.input_ids for r in rows], [r.input_tokens for r in rows], request.threshold
    )


async def started(engine: FakeEngine) -> None:
    assert await asyncio.to_thread(engine.started.wait, 30)


async def until(condition, timeout: float = 30) -> None:
    """Poll ``condition()`` until it holds; fail after ``timeout`` seconds."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


async def queued(batcher: Batcher, rows: int) -> None:
    """Until ``rows`` rows are queued (pinning an adapter may run on a loader thread)."""
    await until(lambda: batcher.queued_rows >= rows)


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
    assert listener.stats[0].rows == 4 and engine.repository.pins == 0
    assert timer.fired == 0, "a full batch closes without waiting for the timer"


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
    assert engine.batches == [] and batcher.queue_depth == 1 and engine.repository.pins == 1
    clock.now += 0.5
    timer.fire()
    assert [r.label for r in await task] == ["lonely"]
    assert engine.batches == [["lonely"]]
    assert batcher.queue_depth == 0 and engine.repository.pins == 0


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
    second = asyncio.create_task(batcher.submit(request("e", "f", "g", "h")))
    await queued(batcher, 4)
    with pytest.raises(QueueFullError) as refused:
        await batcher.submit(request("i", "j", "k"))  # 4 + 3 > max_queue 6
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    with pytest.raises(PayloadTooLargeError):
        await batcher.submit(request(*"abcdefg"))  # more rows than the whole queue holds
    assert engine.repository.pins == 2
    engine.gate.set()
    assert len(await running) == 4 and len(await second) == 4


async def test_timeout(parts) -> None:
    _, engine, *_ = parts
    engine.gate.clear()
    short = Batcher(engine, BatcherConfig(max_batch_size=1, max_wait_s=0, request_timeout_s=0.05))
    await short.start()
    try:
        with pytest.raises(RequestTimeoutError):
            await short.submit(request("stuck"))  # the engine is blocked: it cannot answer in time
        assert engine.repository.pins == 0, "a timed-out request gives its adapter back"
    finally:
        engine.gate.set()
        await short.stop()


async def test_stop_drains_accepted_requests_and_refuses_new_ones(parts) -> None:
    batcher, engine, timer, *_ = parts
    engine.gate.clear()
    first = asyncio.create_task(batcher.submit(request("a", "b", "c", "d")))
    await started(engine)
    waiting = [asyncio.create_task(batcher.submit(request(text))) for text in ("e", "f")]
    await queued(batcher, 2)
    stopping = asyncio.create_task(batcher.stop())
    await until(lambda: batcher.stopping)
    with pytest.raises(ShuttingDownError):
        await batcher.submit(request("late"))
    engine.gate.set()
    await stopping
    assert len(await first) == 4
    assert [(await task)[0].label for task in waiting] == ["e", "f"], "drained without waiting for max_wait"
    assert timer.fired == 0
    assert engine.repository.pins == 0 and batcher.queue_depth == 0


async def test_unknown_adapter_is_rejected_at_submit(parts) -> None:
    batcher, *_ = parts
    with pytest.raises(UnknownAdapterError):
        await batcher.submit(TokenizedRequest(adapter="nope", ids=[[1, 2]], input_tokens=[2]))
    assert batcher.queue_depth == 0


async def test_a_request_prepared_for_another_revision_is_refused_and_gives_its_pin_back(parts) -> None:
    batcher, engine, *_ = parts
    stale = dataclasses.replace(request("old"), revision="r0")
    with pytest.raises(AdapterReplacedError):
        await batcher.submit(stale)
    assert engine.repository.pins == 0 and batcher.queue_depth == 0
    current = [dataclasses.replace(request(text), revision="r1") for text in ("a", "b", "c", "d")]
    answers = await asyncio.gather(*(batcher.submit(r) for r in current))
    assert [a[0].label for a in answers] == ["a", "b", "c", "d"] and engine.repository.pins == 0


# ---- with the real engine ------------------------------------------------------------------------


@pytest.fixture
def tiny_repository(tmp_path: Path, tiny_base_dir: Path) -> ModelRepository:
    synthetic_checkpoint(tmp_path / "models" / "keep", str(tiny_base_dir), ["neg", "pos"], seed=0)
    synthetic_checkpoint(tmp_path / "models" / "drop", str(tiny_base_dir), ["x", "y", "z"], seed=2)
    repository = ModelRepository(tmp_path / "models")
    assert repository.scan() == {}
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
        doomed = asyncio.create_task(batcher.submit(tokenized(engine, ClassifyRequest(["good movie"], "drop"))))
        kept = asyncio.create_task(batcher.submit(tokenized(engine, ClassifyRequest(["bad plot", "the"], "keep"))))
        await queued(batcher, 3)
        await asyncio.to_thread(tiny_repository.unload, "drop")
        clock.now += 1
        timer.fire()
        with pytest.raises(AdapterUnloadedError):
            await doomed
        results = await kept
        assert [len(r.probabilities) for r in results] == [2, 2]
        assert listener.stats[-1].rows == 2
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
        answers = await asyncio.gather(*(batcher.submit(tokenized(engine, r)) for r in requests))
    finally:
        await batcher.stop()
    for req, answer in zip(requests, answers, strict=True):
        direct = engine.classify(req)
        assert [a.active_sites for a in answer] == [d.active_sites for d in direct]
        for a, d in zip(answer, direct, strict=True):
            assert a.probabilities == pytest.approx(d.probabilities, abs=1e-5)


# ---- padded budget, pins ------------------------------------------------------------------------


async def test_token_budget_counts_padded_tokens() -> None:
    """1 word and 10 words: 15 real tokens fit a budget of 20, but 2 rows x 12 padded tokens do not."""
    engine = FakeEngine()
    config = BatcherConfig(max_batch_size=8, max_batch_tokens=20, max_wait_s=0, max_queue=100)
    batcher = Batcher(engine, config)
    engine.gate.clear()
    await batcher.start()
    try:
        blocker = asyncio.create_task(batcher.submit(request("hold")))
        await started(engine)  # the worker is busy: the next two requests queue up together
        short = asyncio.create_task(batcher.submit(request("x")))
        long = asyncio.create_task(batcher.submit(request(" ".join("y" * 10))))
        await queued(batcher, 2)
        engine.gate.set()
        await asyncio.gather(blocker, short, long)
        assert engine.batches[1:] == [["x"], [" ".join("y" * 10)]]
    finally:
        engine.gate.set()
        await batcher.stop()


async def test_a_cancelled_request_gives_its_adapter_back(parts) -> None:
    batcher, engine, *_ = parts
    engine.gate.clear()
    running = asyncio.create_task(batcher.submit(request("a", "b", "c", "d")))
    await started(engine)
    abandoned = asyncio.create_task(batcher.submit(request("e")))
    await queued(batcher, 1)
    assert engine.repository.pins == 2
    abandoned.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    assert engine.repository.pins == 1 and batcher.queued_rows == 0, "its queued row is withdrawn"
    engine.gate.set()
    assert len(await running) == 4
    assert engine.batches == [["a", "b", "c", "d"]], "the withdrawn row never ran"


async def test_traffic_over_five_adapters_with_room_for_two(tmp_path: Path, tiny_base_dir: Path) -> None:
    """max_loaded=2, five adapters, concurrent requests: every answer is right, at most two are ever
    loaded, and no adapter is evicted under a queued or running row (that row would fail)."""
    root = tmp_path / "models"
    names = [f"m{i}" for i in range(5)]
    for i, name in enumerate(names):
        synthetic_checkpoint(root / name, str(tiny_base_dir), ["neg", "pos", "mid"][: 2 + i % 2], seed=i)
    reference = Engine(ModelRepository(root), tune_malloc=False)
    reference.repository.scan()
    events = SimpleNamespace(loads=0, evictions=0)
    listener = SimpleNamespace(
        on_adapter_loaded=lambda name, seconds: setattr(events, "loads", events.loads + 1),
        on_adapter_evicted=lambda name: setattr(events, "evictions", events.evictions + 1),
    )
    bounded = ModelRepository(root, max_loaded=2, listener=listener)
    bounded.scan()
    engine = Engine(bounded, tune_malloc=False)
    most_loaded = 0
    real_run = engine.run_batch

    def observed_run(rows):
        nonlocal most_loaded
        most_loaded = max(most_loaded, len(bounded.loaded_names()))
        assert all(bounded.is_current(row.adapter) for row in rows), "a queued row's adapter was evicted"
        return real_run(rows)

    engine.run_batch = observed_run
    batcher = Batcher(engine, BatcherConfig(max_batch_size=4, max_wait_s=0.002, request_timeout_s=60))
    texts = ["good movie", "bad plot the", "w3 w7", "the the movie plot good", "awful"]
    jobs = [ClassifyRequest(texts=[texts[i % 5]], adapter=names[(i * 3) % 5]) for i in range(40)]
    await batcher.start()
    try:
        answers = await asyncio.gather(*(batcher.submit(tokenized(reference, job)) for job in jobs))
    finally:
        await batcher.stop()
    assert most_loaded <= 2 and len(bounded.loaded_names()) <= 2
    for job, (answer,) in zip(jobs, answers, strict=True):
        (expected,) = reference.classify(job)
        assert answer.active_sites == expected.active_sites
        assert answer.probabilities == pytest.approx(expected.probabilities, abs=1e-5)
    assert bounded.in_use() == {}, "every pin was given back"
    assert events.evictions >= 3 and events.loads == events.evictions + len(bounded.loaded_names())


# ---- fairness between clients (key ids) ----------------------------------------------------------


def from_client(client: str, *texts: str) -> TokenizedRequest:
    return replace(request(*texts), client=client)


async def test_a_batch_takes_the_clients_in_turn() -> None:
    """Client "a" has six rows waiting when client "b" sends one: b's row runs in the next batch, not after a's.

    First in, first out between clients would run ``a1..a4``, then ``a5 a6 b1``.
    """
    engine = FakeEngine()
    batcher = Batcher(engine, BatcherConfig(max_batch_size=4, max_wait_s=0, max_queue=100))
    engine.gate.clear()
    await batcher.start()
    try:
        blocker = asyncio.create_task(batcher.submit(from_client("a", "hold")))
        await started(engine)
        flood = [asyncio.create_task(batcher.submit(from_client("a", f"a{i}", f"a{i + 1}"))) for i in (1, 3, 5)]
        await queued(batcher, 6)
        steady = asyncio.create_task(batcher.submit(from_client("b", "b1")))
        await queued(batcher, 7)
        engine.gate.set()
        await asyncio.gather(blocker, steady, *flood)
        assert engine.batches == [["hold"], ["a1", "b1", "a2", "a3"], ["a4", "a5", "a6"]]
    finally:
        engine.gate.set()
        await batcher.stop()


async def test_turns_go_on_across_batches() -> None:
    """Rows of three clients, batches of two: the turns go on across batches (rows stay in order per client)."""
    engine = FakeEngine()
    batcher = Batcher(engine, BatcherConfig(max_batch_size=2, max_wait_s=0, max_queue=100))
    engine.gate.clear()
    await batcher.start()
    try:
        blocker = asyncio.create_task(batcher.submit(from_client("x", "hold")))
        await started(engine)
        jobs = [asyncio.create_task(batcher.submit(from_client(c, f"{c}1", f"{c}2"))) for c in "abc"]
        await queued(batcher, 6)
        engine.gate.set()
        await asyncio.gather(blocker, *jobs)
        assert engine.batches[1:] == [["a1", "b1"], ["c1", "a2"], ["b2", "c2"]]
    finally:
        engine.gate.set()
        await batcher.stop()


async def test_a_full_queue_makes_room_for_a_smaller_client_by_dropping_the_largest_clients_newest() -> None:
    """Longest queue drop: client "a" fills the queue; "b" is admitted and a's newest waiting request is
    answered 503 instead; "a" cannot push "b" out, and "b" cannot grow past "a" the same way."""
    engine = FakeEngine()
    batcher = Batcher(engine, BatcherConfig(max_batch_size=2, max_wait_s=0, max_queue=6))
    engine.gate.clear()
    await batcher.start()
    try:
        blocker = asyncio.create_task(batcher.submit(from_client("a", "hold", "hold")))
        await started(engine)
        a_jobs = [asyncio.create_task(batcher.submit(from_client("a", f"a{i}", f"a{i + 1}"))) for i in (1, 3, 5)]
        await queued(batcher, 6)
        with pytest.raises(QueueFullError):
            await batcher.submit(from_client("a", "a7"))  # a holds the whole queue: refused
        b_job = asyncio.create_task(batcher.submit(from_client("b", "b1")))
        await until(lambda: a_jobs[2].done())
        with pytest.raises(QueueFullError, match="largest share") as dropped:
            await a_jobs[2]  # a's newest request made room for b
        assert dropped.value.retry_after is not None and dropped.value.retry_after >= 1
        await queued(batcher, 5)
        assert batcher.queue_depth == 5
        with pytest.raises(QueueFullError):  # b with 4 more would hold more than a's 4: refused, a untouched
            await batcher.submit(from_client("b", "b2", "b3", "b4", "b5"))
        assert not any(job.done() for job in a_jobs[:2])
        engine.gate.set()
        results = await asyncio.gather(blocker, b_job, *a_jobs[:2])
        assert [[row.label for row in rows] for rows in results[1:]] == [["b1"], ["a1", "a2"], ["a3", "a4"]]
        assert all("a5" not in batch for batch in engine.batches), "the dropped request never ran"
        assert batcher.queue_depth == 0 and engine.repository.pins == 0
    finally:
        engine.gate.set()
        await batcher.stop()


async def test_an_engine_with_two_lanes_runs_two_batches_at_once() -> None:
    """While one batch is held in the engine, the next one starts on the second lane (one lane would wait)."""
    engine = FakeEngine()
    engine.lanes = 2
    entered = threading.Semaphore(0)
    hold = threading.Event()
    real_run = engine.run_batch

    def held_run(rows):
        entered.release()
        assert hold.wait(30)
        return real_run(rows)

    engine.run_batch = held_run
    batcher = Batcher(engine, BatcherConfig(max_batch_size=2, max_wait_s=0, max_queue=10))
    await batcher.start()
    try:
        first = asyncio.create_task(batcher.submit(request("a", "b")))
        second = asyncio.create_task(batcher.submit(request("c", "d")))
        assert await asyncio.to_thread(entered.acquire, True, 30)
        assert await asyncio.to_thread(entered.acquire, True, 30), "the second batch started beside the first"
        hold.set()
        assert [r.label for r in await first] == ["a", "b"] and [r.label for r in await second] == ["c", "d"]
    finally:
        hold.set()
        await batcher.stop()


async def test_the_engine_gives_its_free_memory_back_once_per_idle_spell() -> None:
    """No batch for ``idle_release_s``: the engine releases its free memory, once; traffic postpones it."""
    engine, timer = FakeEngine(), FakeTimer()
    releases = threading.Semaphore(0)
    engine.release_memory = releases.release
    batcher = Batcher(engine, BatcherConfig(max_batch_size=1, idle_release_s=2.0), sleep=timer.sleep)
    await batcher.start()
    try:
        assert [r.label for r in await batcher.submit(request("a"))] == ["a"]
        await until(lambda: timer.requests == [2.0])
        assert not releases.acquire(blocking=False), "not before the idle time has passed"
        timer.fire()
        assert await asyncio.to_thread(releases.acquire, True, 30)

        # A request during the idle wait starts the spell again: one release, after its own idle time.
        assert [r.label for r in await batcher.submit(request("b"))] == ["b"]
        await until(lambda: len(timer.requests) == 2)
        assert [r.label for r in await batcher.submit(request("c"))] == ["c"]
        await until(lambda: len(timer.requests) == 3)
        assert not releases.acquire(blocking=False)
        timer.fire()
        assert await asyncio.to_thread(releases.acquire, True, 30)
        assert engine.batches == [["a"], ["b"], ["c"]]
    finally:
        await batcher.stop()
