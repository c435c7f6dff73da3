"""The engine client (API process side): admission, tokenization, and the engine in its own process.

The engine process is real here: forked by the client from the launcher's template, fed over its
socket, killed with SIGKILL under traffic and restarted.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import poison_weights, synthetic_checkpoint, tiny_text

from service.catalogue import Catalogue
from service.engine_client import EngineClient, LocalTransport
from service.engine_core import EngineCore
from service.errors import AdapterReplacedError, NotReadyError, QueueFullError
from service.lifecycle import build_components
from service.metrics import service_metrics
from service.settings import Settings
from service.tokenization import INLINE_CHARS, Tokenizers
from service.types import ClassifyRequest, RowOutput

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def tiny_dir(tmp_path: Path, tiny_base_dir: Path) -> Path:
    root = tmp_path / "models"
    synthetic_checkpoint(root / "two", str(tiny_base_dir), ["neg", "pos"], seed=0)
    synthetic_checkpoint(root / "rad", str(tiny_base_dir), ["neg", "pos"], method="radlora", seed=3)
    synthetic_checkpoint(root / "plain", str(tiny_base_dir), ["a", "b", "c"], method="lora", seed=5)
    return root


class HeldTransport:
    """An engine that answers only when released, with one made-up output per input."""

    up = True
    queue_depth = 0

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received: list = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def classify(self, request):
        self.received.append(request)
        await self.release.wait()
        return [
            RowOutput([0.25, 0.75], [0.0, 1.0], [0], [4], (1, 0, 0), len(ids), n)
            for ids, n in zip(request.ids, request.input_tokens, strict=True)
        ]

    async def call(self, method, *args):
        raise AssertionError("not called")


async def test_admission_comes_before_tokenization_which_runs_off_the_event_loop(tiny_dir: Path) -> None:
    settings = Settings(model_dir=tiny_dir, max_queue=3, max_batch_size=1)  # 4 rows in flight at most
    catalogue = Catalogue(tiny_dir)
    catalogue.scan()
    transport = HeldTransport()
    client = EngineClient(settings, catalogue, transport)
    tokenizing, release = threading.Event(), threading.Event()
    tokenized: list[str] = []
    real_tokenize = client.tokenizers.tokenize

    def slow_tokenize(base_model, texts, limit, truncate, adapter):
        tokenized.extend(texts)
        tokenizing.set()
        assert release.wait(30)
        return real_tokenize(base_model, texts, limit, truncate, adapter)

    client.tokenizers.tokenize = slow_tokenize
    await client.start()
    try:
        first = asyncio.create_task(client.submit(ClassifyRequest(["good movie", "bad", "the plot"], "two")))
        assert await asyncio.to_thread(tokenizing.wait, 30)
        # The event loop is free while "first" tokenizes, and its rows already count as in flight:
        assert client.queue_depth == 3
        with pytest.raises(QueueFullError):
            await client.submit(ClassifyRequest(["d", "e"], "two"))
        assert tokenized == ["good movie", "bad", "the plot"], "a refused request is never tokenized"
        release.set()
        await asyncio.to_thread(lambda: None)
        while not transport.received:
            await asyncio.sleep(0.001)
        transport.release.set()
        results = await first
        assert [r.label for r in results] == ["pos"] * 3, "named with the catalogue's labels"
        assert [r.active_modules for r in results] == [["layer.0.attention.query"]] * 3
        assert results[0].tokens == len(transport.received[0].ids[0])
    finally:
        release.set()
        transport.release.set()
        await client.stop()


def test_a_short_request_is_tokenized_at_once_unless_that_could_block(tiny_base_dir: Path) -> None:
    """On the calling thread only with the tokenizer loaded and free, for up to INLINE_CHARS characters;
    the same ids as the tokenizer thread's call."""
    tokenizers, base = Tokenizers(), str(tiny_base_dir)
    texts = ["good movie", "the plot " * 30]
    assert tokenizers.tokenize_now(base, texts, 16, True, "two") is None, "not loaded: loading is slow"
    expected = tokenizers.tokenize(base, texts, 16, True, "two")
    assert tokenizers.tokenize_now(base, texts, 16, True, "two") == expected
    assert expected[1] == [4, 62] and len(expected[0][1]) == 16, "cut to the limit, counted before the cut"
    long_request = ["good " * (INLINE_CHARS // 5 + 1)]
    assert tokenizers.tokenize_now(base, long_request, 16, True, "two") is None
    _, lock = tokenizers._for(base)
    with lock:  # another thread is tokenizing with it
        assert tokenizers.tokenize_now(base, texts, 16, True, "two") is None


async def test_a_request_tokenized_for_a_replaced_adapter_is_read_again_and_named_by_the_new_one(
    tiny_dir: Path, tiny_base_dir: Path
) -> None:
    catalogue = Catalogue(tiny_dir)
    catalogue.scan()
    transport = HeldTransport()
    transport.release.set()
    answer = transport.classify

    async def replaced_meanwhile(request):
        if len(transport.received) == 0:  # the folder is replaced while this request was tokenized
            transport.received.append(request)
            synthetic_checkpoint(tiny_dir / "two", str(tiny_base_dir), ["down", "up"], seed=7)
            raise AdapterReplacedError("replaced")
        return await answer(request)

    transport.classify = replaced_meanwhile
    client = EngineClient(Settings(model_dir=tiny_dir), catalogue, transport)
    await client.start()
    try:
        results = await client.submit(ClassifyRequest(["good movie"], "two"))
    finally:
        await client.stop()
    first, second = transport.received
    assert first.revision and second.revision and first.revision != second.revision
    assert [r.label for r in results] == ["up"], "named with the labels of the weights that answered"
    assert catalogue.entry("two").revision == second.revision


def _answers(results) -> list[tuple]:
    return [
        (r.label, [(s.label, s.score) for s in r.scores], r.active_modules, r.active_ranks, r.flops) for r in results
    ]


async def _answers_in_process(settings: Settings, requests: list[ClassifyRequest]) -> list[list[tuple]]:
    """What the engine answers to ``requests`` one by one when it runs in this process."""
    local_settings = settings.model_copy(update={"engine_process": False})
    core = await asyncio.to_thread(EngineCore.build, local_settings, None)
    local = EngineClient(local_settings, core.repository.catalogue, LocalTransport(core))
    await local.start()
    try:
        return [_answers(await local.submit(request)) for request in requests]
    finally:
        await local.stop()


@pytest.mark.integration
async def test_the_engine_process_answers_like_the_engine_in_process_and_survives_a_kill(tiny_dir: Path) -> None:
    """Bit for bit the in-process answers (int8); SIGKILL under traffic: every request that reached the
    engine is answered by its successor, requests meanwhile get 503 with Retry-After, then it serves again."""
    texts = [tiny_text(2 + seed % 11, seed=seed) for seed in range(24)]
    requests = [
        ClassifyRequest([text], ("two", "rad", "plain")[i % 3], (None, 0.3)[i % 2]) for i, text in enumerate(texts)
    ]
    settings = Settings(model_dir=tiny_dir, dtype="int8", preload_adapters=3, engine_processes=1)
    expected = await _answers_in_process(settings, requests)

    metrics = service_metrics(settings)
    repository, client = await build_components(settings, metrics)
    await client.start()
    transport = client.transport
    try:
        assert transport.pid is not None and transport.pid != os.getpid()
        assert sorted(repository.loaded_names()) == ["plain", "rad", "two"]
        answers = await asyncio.gather(*(client.submit(request) for request in requests))
        assert [_answers(a) for a in answers] == expected
        assert metrics.registry.get_sample_value("cogalora_batch_size_count") >= 1, "engine batches reach /metrics"

        burst = [asyncio.create_task(client.submit(request)) for request in requests * 8]
        while not transport._pending:  # some requests are in the engine
            await asyncio.sleep(0.001)
        in_engine = len(transport._pending)
        os.kill(transport.pid, signal.SIGKILL)
        outcomes = await asyncio.gather(*burst, return_exceptions=True)
        answered = [o for o in outcomes if not isinstance(o, Exception)]
        refused = [o for o in outcomes if isinstance(o, Exception)]
        assert all(isinstance(o, NotReadyError) and o.retry_after for o in refused), refused[:3]
        assert len(answered) >= in_engine > 0, "every request the dead engine held is answered by the next one"
        for outcome, request in zip(outcomes, requests * 8, strict=True):
            if not isinstance(outcome, Exception):
                assert _answers(outcome) == expected[requests.index(request)]
        while not transport.up:
            await asyncio.sleep(0.05)
        assert transport.restarts == 1
        assert [_answers(await client.submit(r)) for r in requests[:6]] == expected[:6]
    finally:
        await client.stop()
    assert transport._process.returncode == 0, "stopped on request, not killed"


async def test_what_the_engine_processes_fail_to_load_at_start_is_listed_before_any_request(tiny_dir: Path) -> None:
    """An adapter whose weights hold a NaN passes the API process's header-only scan, then fails its preload in
    the engine processes: the API process lists it as unavailable, with the reason, as soon as it is ready."""
    from service.errors import AdapterLoadError

    poison_weights(tiny_dir / "rad" / "adapter_model.safetensors", "lora_A")
    settings = Settings(model_dir=tiny_dir, dtype="int8", preload_adapters=3, engine_processes=2)
    repository, client = await build_components(settings, service_metrics(settings))
    await client.start()
    try:
        assert sorted(repository.failures) == ["rad"]
        assert "values that are not finite" in repository.failures["rad"]
        assert sorted(repository.loaded_names()) == ["plain", "two"]
        with pytest.raises(AdapterLoadError, match="not finite"):
            await client.submit(ClassifyRequest([tiny_text(4)], "rad"))
        assert len(await client.submit(ClassifyRequest([tiny_text(4)], "two"))) == 1
    finally:
        await client.stop()


@pytest.mark.integration
async def test_without_a_fork_server_the_engine_is_spawned_and_answers_the_same(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where multiprocessing has no fork server (not Linux or macOS), each engine process is spawned and
    imports its libraries itself: this process's own child, named like a forked engine, with the answers
    of the engine in process."""
    from processes import parent_pid, process_name

    from service.engine_launcher import ENGINE_PROCESS_NAME

    requests = [ClassifyRequest([tiny_text(3 + i, seed=i)], ("two", "rad", "plain")[i % 3]) for i in range(6)]
    settings = Settings(model_dir=tiny_dir, dtype="int8", preload_adapters=3, engine_processes=1)
    expected = await _answers_in_process(settings, requests)

    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["fork", "spawn"])
    _, client = await build_components(settings, service_metrics(settings))
    await client.start()
    transport = client.transport
    try:
        assert transport._process.start_method == "spawn"
        assert parent_pid(transport.pid) == os.getpid(), "spawned by this process, not forked by a template"
        assert process_name(transport.pid) == ENGINE_PROCESS_NAME
        assert [_answers(await client.submit(request)) for request in requests] == expected
    finally:
        await client.stop()
    assert transport._process.returncode == 0, "stopped on request, not killed"


@pytest.mark.integration
def test_a_dead_engine_makes_the_service_unready_until_its_successor_serves(tiny_dir: Path, start_service) -> None:
    """Through HTTP: SIGKILL the engine process of a real ``python -m service``: /ready and /classify answer
    503 not_ready with Retry-After while it restarts, then it answers again, the same bits as before."""
    import httpx
    import psutil
    from processes import API_KEY, engine_pids

    service = start_service(tiny_dir, COGALORA_API_KEY=API_KEY, COGALORA_DTYPE="int8", COGALORA_ENGINE_PROCESSES="1")
    headers = {"X-API-Key": API_KEY}
    body = {"inputs": [tiny_text(7, seed=1), tiny_text(3, seed=2)], "adapter": "rad"}
    with httpx.Client(base_url=service.url, timeout=60, trust_env=False, headers=headers) as client:
        before = client.post("/classify", json=body).json()
        (engine,) = (psutil.Process(pid) for pid in engine_pids(service.proc.pid))
        engine.kill()
        engine.wait(30)
        deadline = time.monotonic() + 60
        while (ready := client.get("/ready")).status_code == 200:  # until the service has noticed
            assert time.monotonic() < deadline
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        refused = client.post("/classify", json=body)
        assert refused.status_code == 503 and refused.json()["error_type"] == "not_ready", refused.text
        assert refused.headers["Retry-After"]
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.1)
        assert client.post("/classify", json=body).json() == before
        (successor,) = engine_pids(service.proc.pid)
        assert successor != engine.pid


@pytest.mark.integration
async def test_two_engine_processes_share_the_traffic_and_survive_one_being_killed(tiny_dir: Path) -> None:
    """Two engine processes: both serve, the same bits as one; admin changes reach both; SIGKILL one under
    traffic and no request fails (the others serve meanwhile, the dead one's requests go to its successor)."""
    texts = [tiny_text(2 + seed % 11, seed=seed) for seed in range(24)]
    requests = [
        ClassifyRequest([text], ("two", "rad", "plain")[i % 3], (None, 0.3)[i % 2]) for i, text in enumerate(texts)
    ]
    one = Settings(model_dir=tiny_dir, dtype="int8", preload_adapters=3, engine_lanes=2, engine_processes=1)
    repository, client = await build_components(one, service_metrics(one))
    await client.start()
    try:
        expected = [_answers(await client.submit(request)) for request in requests]
    finally:
        await client.stop()

    settings = one.model_copy(update={"engine_processes": 2, "preload_adapters": 1})
    repository, client = await build_components(settings, service_metrics(settings))
    await client.start()
    pool = client.transport
    try:
        assert len(set(pool.pids)) == 2 and os.getpid() not in pool.pids
        assert repository.loaded_names() == ["plain"], "preloaded in both, reported once"
        answers = await asyncio.gather(*(client.submit(request) for request in requests * 4))
        assert [_answers(a) for a in answers] == expected * 4
        assert sorted(repository.loaded_names()) == ["plain", "rad", "two"]
        await asyncio.to_thread(repository.unload, "rad")
        assert sorted(repository.loaded_names()) == ["plain", "two"], "unloaded in both processes"
        assert all("rad" not in resident for resident in pool._resident)
        await asyncio.to_thread(repository.load, "rad")
        assert all("rad" in resident for resident in pool._resident), "loaded in both processes"

        burst = [asyncio.create_task(client.submit(request)) for request in requests * 8]
        while not all(member._pending for member in pool.members):  # both processes hold requests
            await asyncio.sleep(0.001)
        victim = pool.members[0]
        os.kill(victim.pid, signal.SIGKILL)
        outcomes = await asyncio.gather(*burst, return_exceptions=True)
        assert [_answers(o) for o in outcomes] == expected * 8, "no request lost, every answer the same bits"
        while not victim.up:
            await asyncio.sleep(0.05)
        assert victim.restarts == 1 and pool.members[1].restarts == 0
        assert [_answers(await client.submit(r)) for r in requests[:6]] == expected[:6]
    finally:
        await client.stop()
    assert all(member._process.returncode == 0 for member in pool.members), "stopped on request, not killed"


@pytest.mark.integration
def test_with_two_engine_processes_killing_one_leaves_the_service_ready_and_answering(
    tiny_dir: Path, start_service
) -> None:
    """Through HTTP: SIGKILL one of two engine processes of a real ``python -m service``: every request is
    still answered (the same bits), /ready stays 200, and a successor takes the dead one's place."""
    import httpx
    import psutil
    from processes import engine_pids, parent_pid

    service = start_service(tiny_dir, COGALORA_DTYPE="int8", COGALORA_ENGINE_LANES="2", COGALORA_ENGINE_PROCESSES="2")
    body = {"inputs": [tiny_text(7, seed=1), tiny_text(3, seed=2)], "adapter": "rad"}
    with httpx.Client(base_url=service.url, timeout=60, trust_env=False) as client:
        before = client.post("/classify", json=body).json()
        engines = [psutil.Process(pid) for pid in engine_pids(service.proc.pid)]
        assert len(engines) == 2
        assert client.get("/info").json()["engine_processes"] == 2
        engines[0].kill()
        engines[0].wait(30)
        for _ in range(20):
            assert client.post("/classify", json=body).json() == before
            assert client.get("/ready").status_code == 200
        deadline = time.monotonic() + 60
        while set(engine_pids(service.proc.pid)) in ({engines[1].pid}, set()):
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.1)
        successors = engine_pids(service.proc.pid)
        assert len(successors) == 2 and engines[0].pid not in successors
        (template,) = {parent_pid(pid) for pid in successors}
        assert template != service.proc.pid, "forked from one template process, not started by the API process"
        for pid in successors:  # what the template imported (torch, transformers) is shared, not copied
            assert shared_dirty_mb(pid) > 100, shared_dirty_mb(pid)
        assert client.post("/classify", json=body).json() == before


def shared_dirty_mb(pid: int) -> float:
    """Memory of ``pid`` written before a fork and still shared with its parent (MB, /proc smaps_rollup)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Shared_Dirty:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no Shared_Dirty in /proc/{pid}/smaps_rollup")


_LEFT_RUNNING = """
import asyncio, os, sys, tempfile
from service.engine_launcher import EngineProcess

held = []  # the engine's connection stays open until this process has exited

async def main():
    path = os.path.join(tempfile.mkdtemp(), "engine.sock")
    connected = asyncio.Event()
    def accept(reader, writer):
        held.append(writer)
        connected.set()
    server = await asyncio.start_unix_server(accept, path=path)
    held.append(server)
    engine = EngineProcess(path)
    await engine.start()
    await connected.wait()  # the engine waits for its settings, which never come
    print(engine.pid, flush=True)

asyncio.run(main())
"""


@pytest.mark.integration
def test_a_process_that_exits_without_stopping_its_engine_kills_it_instead_of_waiting_for_it() -> None:
    """An engine ignores SIGTERM and stops only when told to or when its socket closes; a process that
    exits without stopping it (a crash) must neither hang at exit nor leave the engine running."""
    import subprocess
    import sys

    import psutil

    repo = Path(__file__).parents[1]
    command = [sys.executable, "-c", _LEFT_RUNNING]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=repo)
    assert finished.returncode == 0, finished.stderr
    pid = int(finished.stdout.split()[0])

    def running() -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 30  # killed at exit; its reaper (the template, or init) may take a moment
    while running():
        assert time.monotonic() < deadline, f"engine {pid} outlived the process that started it"
        time.sleep(0.05)
