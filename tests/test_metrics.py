"""Prometheus metrics (docs/service.md): exact names, bounded labels, and counts that move by exactly N."""

from __future__ import annotations

import asyncio
from collections import Counter

from api_fakes import fake_components, running
from prometheus_client.parser import text_string_to_metric_families

from cogalora.architectures import parse_site_name
from service.app import create_app
from service.metric_definitions import METRICS
from service.settings import Settings


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text page, keyed by (sample name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(page: dict, name: str, **labels: str) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


def family_types(text: str) -> dict[str, str]:
    types = {}
    for family in text_string_to_metric_families(text):
        suffix = "_total" if family.type == "counter" else ""
        types[family.name + suffix] = family.type
    return types


async def test_every_defined_metric_is_exposed_with_its_type_and_nothing_else(tmp_path):
    app = create_app(Settings(model_dir=tmp_path), components=fake_components(["sst2"]))
    async with running(app) as client:
        await client.post("/classify", json={"inputs": "good words"})
        text = (await client.get("/metrics")).text
    exposed = {name: kind for name, kind in family_types(text).items() if not name.endswith("_created")}
    assert exposed == {metric.documented_name: metric.kind for metric in METRICS}


async def test_counts_move_by_exactly_n(tmp_path):
    app = create_app(Settings(model_dir=tmp_path), components=fake_components(["sst2", "agnews"]))
    requests = [
        ["good"],
        ["one two three", "good good"],
        ["a b c d e f"],
        ["x", "y", "z"],
        ["good film", "bad film", "okay"],
    ]
    async with running(app) as client:
        before = samples((await client.get("/metrics")).text)
        rows = []
        for texts in requests:
            response = await client.post("/classify", json={"inputs": texts, "adapter": "sst2"})
            assert response.status_code == 200
            rows.extend(response.json()["results"])
        assert (await client.post("/classify", json={"inputs": "x", "adapter": "secret-name"})).status_code == 404
        assert (await client.post("/classify", json={"inputs": "x"})).status_code == 422
        after = samples((await client.get("/metrics")).text)

    n, inputs = len(requests), len(rows)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("cogalora_requests_total", adapter="sst2", code="200") == n
    assert moved("cogalora_requests_total", adapter="unknown", code="404") == 1
    assert moved("cogalora_requests_total", adapter="unknown", code="422") == 1
    assert moved("cogalora_request_duration_seconds_count", adapter="sst2") == n
    assert moved("cogalora_request_duration_seconds_count", adapter="unknown") == 2
    assert moved("cogalora_queue_duration_seconds_count", adapter="sst2") == n
    assert moved("cogalora_inference_duration_seconds_count", adapter="sst2") == n
    assert moved("cogalora_inputs_total", adapter="sst2") == inputs
    assert moved("cogalora_input_tokens_count", adapter="sst2") == inputs
    assert moved("cogalora_input_tokens_sum", adapter="sst2") == sum(row["tokens"] for row in rows)
    assert moved("cogalora_active_adapters_count", adapter="sst2") == inputs
    assert moved("cogalora_active_adapters_sum", adapter="sst2") == sum(row["active_adapters"] for row in rows)
    assert moved("cogalora_active_rank_count", adapter="sst2") == inputs
    assert moved("cogalora_active_rank_sum", adapter="sst2") == sum(row["active_rank"] for row in rows)
    assert moved("cogalora_request_flops_count", adapter="sst2") == inputs
    assert moved("cogalora_request_flops_sum", adapter="sst2") == sum(row["flops"]["total"] for row in rows)
    assert moved("cogalora_adapter_flops_total", adapter="sst2") == sum(row["flops"]["adapter"] for row in rows)
    saved = sum(row["flops"]["adapter_saved"] for row in rows)
    assert moved("cogalora_adapter_flops_saved_total", adapter="sst2") == saved
    assert moved("cogalora_batch_size_count") == n  # the fake runs one forward per request
    assert moved("cogalora_batch_size_sum") == inputs
    assert moved("cogalora_batch_duration_seconds_count") == n

    activations = Counter(site for row in rows for site in row["active_modules"])
    assert activations
    for site, count in activations.items():
        layer, module = parse_site_name(site)
        assert moved("cogalora_module_activations_total", adapter="sst2", layer=str(layer), module=module) == count

    # bounded labels: a requested-but-unknown adapter never becomes a label value
    adapters = {dict(labels).get("adapter") for (_, labels) in after if dict(labels).get("adapter")}
    assert adapters <= {"sst2", "agnews", "unknown"}
    assert value(after, "cogalora_inflight_requests") == 0
    assert value(after, "cogalora_queue_depth") == 0
    assert value(after, "cogalora_adapters_loaded") == 2


async def test_401_and_413_are_counted_as_unknown(tmp_path):
    settings = Settings(model_dir=tmp_path, api_key="k", max_body_bytes=100)
    app = create_app(settings, components=fake_components(["sst2"]))
    async with running(app) as client:
        assert (await client.post("/classify", json={"inputs": "x"})).status_code == 401
        big = {"inputs": "x" * 200}
        assert (await client.post("/classify", json=big, headers={"X-API-Key": "k"})).status_code == 413
        page = samples((await client.get("/metrics")).text)
    assert value(page, "cogalora_requests_total", adapter="unknown", code="401") == 1
    assert value(page, "cogalora_requests_total", adapter="unknown", code="413") == 1


async def test_gauges_follow_queue_and_inflight(tmp_path):
    factory = fake_components(["sst2"])
    app = create_app(Settings(model_dir=tmp_path), components=factory)
    async with running(app) as client:
        batcher = factory.made["batcher"]
        batcher.gate.clear()
        held = [asyncio.create_task(client.post("/classify", json={"inputs": ["a", "b", "c"]})) for _ in range(2)]
        while batcher.inflight < 2:
            await asyncio.sleep(0)
        page = samples((await client.get("/metrics")).text)
        assert value(page, "cogalora_queue_depth") == 6
        assert value(page, "cogalora_inflight_requests") == 2
        batcher.gate.set()
        assert [(await task).status_code for task in held] == [200, 200]
        page = samples((await client.get("/metrics")).text)
        assert value(page, "cogalora_queue_depth") == 0
        assert value(page, "cogalora_inflight_requests") == 0


async def test_each_app_has_its_own_registry(tmp_path):
    first = create_app(Settings(model_dir=tmp_path), components=fake_components(["sst2"]))
    second = create_app(Settings(model_dir=tmp_path), components=fake_components(["sst2"]))
    async with running(first) as client_one, running(second) as client_two:
        await client_one.post("/classify", json={"inputs": "good"})
        one = samples((await client_one.get("/metrics")).text)
        two = samples((await client_two.get("/metrics")).text)
    assert value(one, "cogalora_requests_total", adapter="sst2", code="200") == 1
    assert value(two, "cogalora_requests_total", adapter="sst2", code="200") == 0
