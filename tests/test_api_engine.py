"""The app on the real repository, engine and batcher (packaged MiniLM): answers, overload, timeouts, admin."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections import Counter

import pytest
import torch
from api_fakes import assert_envelope, on_engine, running
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.engine_core import build_engine
from service.metrics import ServiceMetrics
from service.settings import Settings

pytestmark = pytest.mark.integration

TEXTS = [
    "an absolutely wonderful film with a moving story",
    "the plot was dull and the acting was worse",
    "ok",
    "stocks rallied after the central bank cut interest rates again this quarter",
    "the team won the championship in overtime",
]


class GatedEngine:
    """The real engine, but ``run_batch`` waits for ``release`` (so a test can fill the queue deterministically)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def run_batch(self, rows):
        self.entered.set()
        self.release.wait(timeout=60)
        return self.engine.run_batch(rows)

    def __getattr__(self, name):
        return getattr(self.engine, name)


@pytest.fixture(scope="module")
def loaded(minilm_model_dir):
    """Repository and engine loaded once for the module (loading MiniLM is the slow part)."""
    return build_engine(Settings(model_dir=minilm_model_dir), ServiceMetrics())


@pytest.fixture
def own_model_dir(minilm_model_dir, tmp_path):
    """A private copy of the model repository, for tests that add or remove folders."""
    copy = tmp_path / "models"
    shutil.copytree(minilm_model_dir, copy)
    return copy


def app_on(loaded, minilm_model_dir, gated: GatedEngine | None = None, **overrides):
    repository, engine = loaded
    settings = Settings(model_dir=minilm_model_dir, **overrides)

    return create_app(settings, components=on_engine(repository, gated or engine))


async def classify(client, inputs, adapter="sst2", **extra):
    response = await client.post("/classify", json={"inputs": inputs, "adapter": adapter, **extra})
    assert response.status_code == 200, response.text
    return response.json()["results"]


async def test_answers_have_the_contract_shape(loaded, minilm_model_dir):
    async with running(app_on(loaded, minilm_model_dir)) as client:
        adapters = {a["name"]: a for a in (await client.get("/adapters")).json()["adapters"]}
        assert set(adapters) == {"sst2", "agnews", "plain"}
        for name, adapter in adapters.items():
            rows = await classify(client, TEXTS, adapter=name)
            assert len(rows) == len(TEXTS)
            for row in rows:
                assert row["scores"][0]["label"] == row["label"]
                assert sorted(entry["label"] for entry in row["scores"]) == sorted(adapter["labels"])
                assert row["active_adapters"] == len(row["active_modules"]) <= row["total_adapters"] == 36
                assert set(row["flops"]) == {"total", "adapter", "adapter_saved"}
                if adapter["method"] == "lora":
                    assert row["active_adapters"] == 36 and row["flops"]["adapter_saved"] == 0
        single = await classify(client, TEXTS[0])
        assert len(single) == 1


async def test_batched_answer_equals_solo_answers(loaded, minilm_model_dir):
    async with running(app_on(loaded, minilm_model_dir)) as client:
        together = await classify(client, TEXTS)
        solo = await asyncio.gather(*(classify(client, text) for text in TEXTS))
    for row, (alone,) in zip(together, solo, strict=True):
        assert row["label"] == alone["label"]
        assert row["active_modules"] == alone["active_modules"]
        assert row["score"] == pytest.approx(alone["score"], abs=1e-5)


async def test_threshold_override_switches_gates(loaded, minilm_model_dir):
    async with running(app_on(loaded, minilm_model_dir)) as client:
        everything = await classify(client, TEXTS, threshold=0.0)
        nothing = await classify(client, TEXTS, threshold=1.0)
        default = await classify(client, TEXTS)
    assert all(row["active_adapters"] == row["total_adapters"] for row in everything)
    assert all(row["active_adapters"] == 0 and row["flops"]["adapter"] == 0 for row in nothing)
    assert any(0 < row["active_adapters"] < row["total_adapters"] for row in default)


async def test_truncate_false_rejects_long_input(loaded, minilm_model_dir):
    long_text = " ".join(["word"] * 400)
    async with running(app_on(loaded, minilm_model_dir)) as client:
        response = await client.post(
            "/classify", json={"inputs": ["ok", long_text], "truncate": False, "adapter": "sst2"}
        )
        assert_envelope(response, 413, "input_too_long")
        rows = await classify(client, ["ok", long_text])
        assert rows[1]["tokens"] == 128  # the checkpoint's max_length


async def test_truncation_is_reported_per_input_and_counted(loaded, minilm_model_dir):
    """Issue 16.3: a cut input says so and how long it was; a short one says it was not cut."""
    long_text = " ".join(["word"] * 400)  # one token per word, plus [CLS] and [SEP]
    async with running(app_on(loaded, minilm_model_dir)) as client:
        short, cut = await classify(client, ["a short review", long_text], adapter="agnews")
        page = (await client.get("/metrics")).text
    assert (short["truncated"], short["input_tokens"]) == (False, short["tokens"])
    assert (cut["truncated"], cut["input_tokens"], cut["tokens"]) == (True, 402, 128)
    counted = {
        sample.labels["adapter"]: sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name == "cogalora_truncated_inputs_total"
    }
    assert counted == {"agnews": 1.0}


async def test_raw_scores_are_the_logits_behind_the_probabilities(loaded, minilm_model_dir):
    async with running(app_on(loaded, minilm_model_dir)) as client:
        plain = await classify(client, TEXTS[:2], adapter="agnews")
        raw = await classify(client, TEXTS[:2], adapter="agnews", raw_scores=True)
    assert all("raw_scores" not in row for row in plain)
    for row, with_raw in zip(plain, raw, strict=True):
        assert [entry["label"] for entry in with_raw["scores"]] == [entry["label"] for entry in row["scores"]]
        assert [entry["score"] for entry in with_raw["scores"]] == pytest.approx(
            [entry["score"] for entry in row["scores"]], abs=1e-6
        )
        logits = with_raw["raw_scores"]
        assert [entry["label"] for entry in logits] == [entry["label"] for entry in row["scores"]]
        probabilities = torch.softmax(torch.tensor([entry["score"] for entry in logits]), -1)
        assert probabilities.tolist() == pytest.approx([entry["score"] for entry in row["scores"]], abs=1e-5)


async def test_overload_rejects_fast_and_answers_every_accepted_request(loaded, minilm_model_dir):
    _, engine = loaded
    gated = GatedEngine(engine)
    gated.release.clear()
    app = app_on(loaded, minilm_model_dir, gated=gated, max_queue=12, max_batch_size=4, max_wait_ms=0)
    async with running(app) as client:
        sent = 40
        tasks = [
            asyncio.create_task(client.post("/classify", json={"inputs": TEXTS[:3], "adapter": "agnews"}))
            for _ in range(sent)
        ]
        # the engine is held; every request is either rejected (answered) or accepted (waiting)
        repository = app.state.service.repository

        def accepted() -> int:  # accepted requests hold a pin on their adapter until answered
            return repository.in_use().get("agnews", 0)

        async def settled() -> None:
            while sum(task.done() for task in tasks) + accepted() < sent:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(settled(), 60)
        assert not gated.release.is_set()
        rejected = [task.result() for task in tasks if task.done()]
        assert len(rejected) == sent - accepted() > 0
        for response in rejected:
            assert_envelope(response, 503, "queue_full")
            assert int(response.headers["retry-after"]) >= 1
        gated.release.set()
        responses = await asyncio.gather(*tasks)
        codes = Counter(response.status_code for response in responses)
        assert set(codes) == {200, 503} and codes[200] + codes[503] == sent
        assert codes[503] == len(rejected)
        assert codes[200] >= 4  # 12 queued rows are 4 requests, plus the batch the engine holds
        expected = await classify(client, TEXTS[:3], adapter="agnews")
        for response in responses:
            if response.status_code == 200:
                rows = response.json()["results"]
                assert [r["label"] for r in rows] == [r["label"] for r in expected]
                assert [r["active_modules"] for r in rows] == [r["active_modules"] for r in expected]


async def test_timeout_gives_504_and_the_server_recovers(loaded, minilm_model_dir):
    _, engine = loaded
    gated = GatedEngine(engine)
    gated.release.clear()
    # The gated engine makes the first request time out whatever the limit; the limit only has to let
    # the second one (behind the first's released row) finish on a loaded 2-core machine: 0.2 s did not.
    app = app_on(loaded, minilm_model_dir, gated=gated, request_timeout_s=2.0)
    async with running(app) as client:
        response = await client.post("/classify", json={"inputs": "hello", "adapter": "sst2"})
        assert_envelope(response, 504, "timeout")
        gated.release.set()
        assert len(await classify(client, "hello again")) == 1


async def test_metrics_match_the_responses(loaded, minilm_model_dir):
    async with running(app_on(loaded, minilm_model_dir)) as client:
        rows = []
        batches = [TEXTS[:2], TEXTS[2:], [TEXTS[0]], TEXTS]
        for texts in batches:
            rows += await classify(client, texts, adapter="agnews")
        page = (await client.get("/metrics")).text
    values = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.labels.get("adapter") in (None, "agnews"):
                key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "adapter")))
                values[key] = sample.value
    assert values[("cogalora_requests_total", (("code", "200"),))] == len(batches)
    assert values[("cogalora_request_duration_seconds_count", ())] == len(batches)
    assert values[("cogalora_inputs_total", ())] == len(rows)
    assert values[("cogalora_active_adapters_count", ())] == len(rows)
    assert values[("cogalora_active_adapters_sum", ())] == sum(row["active_adapters"] for row in rows)
    # CoGaLoRA at rank 8: every active site uses the full rank.
    assert values[("cogalora_active_rank_sum", ())] == sum(row["active_rank"] for row in rows)
    assert all(row["active_rank"] == 8 * row["active_adapters"] for row in rows)
    assert values[("cogalora_input_tokens_sum", ())] == sum(row["tokens"] for row in rows)
    assert values[("cogalora_batch_size_sum", ())] == len(rows)
    sites = Counter(site for row in rows for site in row["active_modules"])
    for site, count in sites.items():
        _, layer, module = site.split(".", 2)
        assert values[("cogalora_module_activations_total", (("layer", layer), ("module", module)))] == count


async def test_admin_unload_and_reload_for_real(own_model_dir):
    settings = Settings(model_dir=own_model_dir, admin_key="admin-s3cret")
    async with running(create_app(settings)) as client:
        client.headers["X-API-Key"] = "admin-s3cret"
        before = await classify(client, TEXTS[:2], adapter="plain")
        assert (await client.delete("/adapters/plain")).status_code == 200
        assert_envelope(
            await client.post("/classify", json={"inputs": "x", "adapter": "plain"}), 404, "unknown_adapter"
        )
        assert_envelope(await client.delete("/adapters/plain"), 404, "unknown_adapter")
        reloaded = await client.post("/adapters/plain")
        assert reloaded.status_code == 201, reloaded.text
        assert reloaded.json()["method"] == "lora"
        assert_envelope(await client.post("/adapters/plain"), 409, "adapter_conflict")
        after = await classify(client, TEXTS[:2], adapter="plain")
    assert [row["label"] for row in after] == [row["label"] for row in before]
    assert [row["score"] for row in after] == pytest.approx([row["score"] for row in before], abs=1e-5)


async def test_admin_load_of_a_broken_folder_is_422(own_model_dir):
    async with running(create_app(Settings(model_dir=own_model_dir, admin_key="admin-s3cret"))) as client:
        client.headers["X-API-Key"] = "admin-s3cret"
        broken = own_model_dir / "broken"
        broken.mkdir()
        (broken / "cogalora.json").write_text("{not json", encoding="utf-8")
        body = assert_envelope(await client.post("/adapters/broken"), 422, "adapter_load_failed")
        assert str(own_model_dir) not in body["error"]
        assert "broken" in (await client.get("/adapters")).json()["unavailable"]
        assert len(await classify(client, "still fine")) == 1


async def test_shadow_checks_through_http_change_no_answer_and_count_every_row(loaded, minilm_model_dir):
    """shadow_fraction 1 vs 0 on the same repository: identical answers; one shadow check per routed input."""
    from service.engine import Engine

    repository, _ = loaded
    texts = TEXTS * 3
    answers = {}
    for fraction in (0.0, 1.0):
        engine = Engine(repository, tune_malloc=False, shadow_fraction=fraction)
        async with running(app_on((repository, engine), minilm_model_dir)) as client:
            answers[fraction] = await classify(client, texts)
            answers[fraction] += await classify(client, texts[:4], adapter="plain")
            page = (await client.get("/metrics")).text
        shadow = {
            (sample.labels["adapter"], sample.labels["agreement"]): sample.value
            for family in text_string_to_metric_families(page)
            for sample in family.samples
            if sample.name == "cogalora_shadow_rows_total"
        }
        expected = len(texts) if fraction else 0
        assert sum(shadow.values()) == expected, "plain LoRA rows have nothing to check"
        assert sum(v for (adapter, _), v in shadow.items() if adapter == "sst2") == expected
    assert answers[1.0] == answers[0.0], "to the last digit"
