"""A fake engine side for the HTTP contract tests: adapters by name, answers computed from the text.

``running(app)`` runs an app's lifespan around an in-process httpx client (the in-process way of
running the service; ``processes.ServiceProcess`` is the real-process way).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from service.errors import (
    AdapterConflictError,
    AdapterRequiredError,
    InputTooLongError,
    QueueFullError,
    UnknownAdapterError,
)
from service.schemas import Flops, LabelScore, RowResult
from service.types import AdapterDescription, BatchStats, ClassifyRequest

SITES = [f"layer.{i}.{kind}" for i in range(2) for kind in ("attention.query", "ffn.down")]
#: The fake adapters' max_length in tokens (one token per word, plus two special tokens).
FAKE_MAX_LENGTH = 16


@asynccontextmanager
async def running(app: FastAPI, wait_ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan around an httpx client that talks to it in-process."""
    async with app.router.lifespan_context(app):
        if wait_ready:
            await asyncio.wait_for(app.state.service.ready_event.wait(), 120)
            assert app.state.service.state == "ready"
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            yield client


def info(name: str, labels: tuple[str, ...] = ("negative", "positive")) -> AdapterDescription:
    return AdapterDescription(
        name=name,
        base_model="fake-base",
        method="cogalora",
        labels=list(labels),
        tau=0.5,
        max_length=FAKE_MAX_LENGTH,
        total_adapters=len(SITES),
        sites=list(SITES),
        dropped_sites=[],
        rank=8,
        metrics={"dev_accuracy": 0.9},
    )


class FakeRepository:
    """Adapters by name; ``available`` are the folders an admin load may pick up."""

    max_loaded = 8

    def __init__(self, names: list[str], available: list[str] | None = None) -> None:
        self.loaded = {name: info(name) for name in names}
        self.available = set(available or []) | set(names)
        self.failures: dict[str, str] = {}

    def names(self) -> list[str]:
        return sorted(self.loaded)

    def loaded_names(self) -> list[str]:
        return sorted(self.loaded)

    def resolve(self, requested: str | None) -> str:
        if requested is None:
            if len(self.loaded) == 1:
                return next(iter(self.loaded))
            raise AdapterRequiredError(f"'adapter' is required: {len(self.loaded)} adapters are available")
        self.info(requested)
        return requested

    def adapters(self) -> list[AdapterDescription]:
        return list(self.loaded.values())

    def info(self, name: str) -> AdapterDescription:
        if name not in self.loaded:
            raise UnknownAdapterError(f"unknown adapter {name[:64]!r}")
        return self.loaded[name]

    def load(self, name: str) -> AdapterDescription:
        if name not in self.available:
            raise UnknownAdapterError(f"no checkpoint named {name!r}")
        if name in self.loaded:
            raise AdapterConflictError(f"adapter {name!r} is already loaded")
        self.loaded[name] = info(name)
        return self.loaded[name]

    def unload(self, name: str) -> None:
        if self.loaded.pop(name, None) is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")


def fake_row(text: str, labels: list[str]) -> RowResult:
    """Deterministic: label = 'positive' iff the text contains 'good'; one active module per word."""
    label = labels[1] if "good" in text else labels[0]
    words = len(text.split())
    active = SITES[: min(words, len(SITES))]
    return RowResult(
        label=label,
        score=0.9,
        scores=[
            LabelScore(label=label, score=0.9),
            *(LabelScore(label=other, score=0.1) for other in labels if other != label),
        ],
        active_adapters=len(active),
        total_adapters=len(SITES),
        active_modules=active,
        active_rank=8 * len(active),
        tokens=min(words + 2, FAKE_MAX_LENGTH),
        input_tokens=words + 2,
        truncated=words + 2 > FAKE_MAX_LENGTH,
        flops=Flops(total=1000.0 + words, adapter=10.0 * len(active), adapter_saved=10.0 * (len(SITES) - len(active))),
        raw_scores=[
            LabelScore(label=label, score=2.0),
            *(LabelScore(label=other, score=0.0) for other in labels if other != label),
        ],
        queue_seconds=0.001,
        inference_seconds=0.002,
    )


class FakeBatcher:
    """Answers at once, or holds every request while ``gate`` is clear; rejects beyond ``max_queue`` rows."""

    def __init__(self, repository: FakeRepository, listener: Any, max_queue: int = 1000, timeout_s: float = 30) -> None:
        self.repository = repository
        self.listener = listener
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.gate = asyncio.Event()
        self.gate.set()
        self.queue_depth = 0
        self.inflight = 0
        self.started = False
        self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def submit(self, request: ClassifyRequest) -> list[RowResult]:
        if self.queue_depth + len(request.texts) > self.max_queue:
            raise QueueFullError("queue full", retry_after=2)
        labels = self.repository.info(request.adapter).labels
        if not request.truncate and any(len(text.split()) + 2 > FAKE_MAX_LENGTH for text in request.texts):
            raise InputTooLongError(f"input longer than max_length {FAKE_MAX_LENGTH}")
        self.queue_depth += len(request.texts)
        self.inflight += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.gate.wait()
        except TimeoutError:
            from service.errors import RequestTimeoutError

            raise RequestTimeoutError(f"no answer within {self.timeout_s:g} s") from None
        finally:
            self.queue_depth -= len(request.texts)
            self.inflight -= 1
        rows = [fake_row(text, labels) for text in request.texts]
        self.listener.on_batch(
            BatchStats(
                rows=len(rows),
                forwards=1,
                padded_tokens=sum(r.tokens for r in rows),
                real_tokens=sum(r.tokens for r in rows),
                inference_seconds=0.002,
                adapter_rows_multiplied=sum(r.active_adapters for r in rows),
            )
        )
        return rows


def fake_components(names: list[str], available: list[str] | None = None, max_queue: int = 1000, hold=None):
    """A components factory for ``create_app``; ``hold`` (an asyncio.Event) delays loading until set."""
    made: dict[str, Any] = {}

    async def factory(settings, listener):
        if hold is not None:
            await hold.wait()
        repository = FakeRepository(names, available)
        batcher = FakeBatcher(repository, listener, max_queue=max_queue, timeout_s=settings.request_timeout_s)
        made.update(repository=repository, batcher=batcher)
        return repository, batcher

    factory.made = made
    return factory


def assert_envelope(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    assert body["error_type"] == error_type, body
    assert isinstance(body["error"], str) and body["error"]
    assert response.headers.get("x-request-id")
    return body


def on_engine(repository, engine):
    """A components factory for ``create_app`` around an already loaded repository and engine (loading
    MiniLM once per module): the engine in the API process, behind the service's own client."""
    from service.engine_client import EngineClient, LocalTransport
    from service.engine_core import EngineCore, make_batcher

    async def components(settings, listener):
        core = EngineCore(repository, make_batcher(engine, settings, listener))
        return repository, EngineClient(settings, repository.catalogue, LocalTransport(core))

    return components
