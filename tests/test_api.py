"""HTTP contract of the app (docs/service.md) against a fake engine side: routes, auth, limits, errors."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from api_fakes import assert_envelope, fake_components, running

import service
from service.app import create_app
from service.settings import DEFAULT_MODEL_DIR, Settings

#: The admin key of the tests that load and unload adapters (admin routes are closed without one).
ADMIN_KEY = "admin-s3cret"


def make_app(tmp_path, names=("sst2",), available=(), hold=None, max_queue=1000, **overrides):
    for name in available:
        (tmp_path / name).mkdir(exist_ok=True)
    settings = Settings(model_dir=tmp_path, **overrides)
    factory = fake_components(list(names), list(available), max_queue=max_queue, hold=hold)
    return create_app(settings, components=factory), factory


async def still_answers(client: httpx.AsyncClient, adapter: str = "sst2", **headers) -> None:
    response = await client.post("/classify", json={"inputs": "good", "adapter": adapter}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["label"] == "positive"


async def test_classify_single_string_and_list_keep_order(tmp_path):
    app, _ = make_app(tmp_path)
    async with running(app) as client:
        single = await client.post("/classify", json={"inputs": "a good film"})
        assert single.status_code == 200
        body = single.json()
        assert body["adapter"] == "sst2"
        assert [row["label"] for row in body["results"]] == ["positive"]
        for header in ("x-request-id", "x-queue-time-ms", "x-inference-time-ms"):
            assert header in single.headers
        assert float(single.headers["x-queue-time-ms"]) == pytest.approx(1.0)
        assert float(single.headers["x-inference-time-ms"]) == pytest.approx(2.0)

        texts = ["bad", "good one", "meh two three", "so good"]
        many = await client.post("/classify", json={"inputs": texts, "adapter": "sst2", "threshold": 0.3})
        labels = [row["label"] for row in many.json()["results"]]
        assert labels == ["negative", "positive", "negative", "positive"]
        assert [row["tokens"] for row in many.json()["results"]] == [3, 4, 5, 4]


async def test_request_id_is_echoed_when_sane_and_replaced_otherwise(tmp_path):
    app, _ = make_app(tmp_path)
    async with running(app) as client:
        kept = await client.get("/health", headers={"X-Request-Id": "abc-123"})
        assert kept.headers["x-request-id"] == "abc-123"
        replaced = await client.get("/health", headers={"X-Request-Id": "x" * 200})
        assert replaced.headers["x-request-id"] != "x" * 200


async def test_adapter_required_when_several_loaded(tmp_path):
    app, _ = make_app(tmp_path, names=("sst2", "agnews"))
    async with running(app) as client:
        assert_envelope(await client.post("/classify", json={"inputs": "x"}), 422, "adapter_required")
        await still_answers(client)


async def test_unknown_adapter_is_404_and_message_is_bounded(tmp_path):
    app, _ = make_app(tmp_path)
    async with running(app) as client:
        body = assert_envelope(
            await client.post("/classify", json={"inputs": "x", "adapter": "n" * 5000}), 404, "unknown_adapter"
        )
        assert len(body["error"]) < 200
        await still_answers(client)


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
async def test_probes_stay_open_with_api_key(tmp_path, path):
    app, _ = make_app(tmp_path, api_key="s3cret")
    async with running(app) as client:
        assert (await client.get(path)).status_code == 200


async def test_api_key_guards_classify_adapters_and_admin(tmp_path):
    app, _ = make_app(tmp_path, available=("extra",), api_key="s3cret")
    async with running(app) as client:
        good = {"inputs": "good", "adapter": "sst2"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cre"}, {"Authorization": "s3cret"}):
            response = await client.post("/classify", json=good, headers=headers)
            assert_envelope(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
        assert_envelope(await client.get("/adapters"), 401, "unauthorized")
        assert_envelope(await client.post("/adapters/extra"), 401, "unauthorized")
        assert_envelope(await client.delete("/adapters/sst2"), 401, "unauthorized")
        # auth is checked before the body is even parsed
        assert_envelope(await client.post("/classify", content=b"{not json"), 401, "unauthorized")
        await still_answers(client, Authorization="Bearer s3cret")
        await still_answers(client, **{"X-API-Key": "s3cret"})
        assert (await client.get("/adapters", headers={"X-API-Key": "s3cret"})).status_code == 200


async def test_body_too_large_by_content_length(tmp_path):
    app, _ = make_app(tmp_path, max_body_bytes=1000)
    async with running(app) as client:
        payload = json.dumps({"inputs": "a" * 2000}).encode()
        response = await client.post("/classify", content=payload, headers={"Content-Type": "application/json"})
        assert_envelope(response, 413, "payload_too_large")
        await still_answers(client)


async def test_body_too_large_when_streamed_without_length(tmp_path):
    app, _ = make_app(tmp_path, max_body_bytes=1000)

    async def chunks():
        yield b'{"inputs": "'
        for _ in range(20):
            yield b"a" * 100
        yield b'"}'

    async with running(app) as client:
        response = await client.post("/classify", content=chunks(), headers={"Content-Type": "application/json"})
        assert "content-length" not in response.request.headers
        assert_envelope(response, 413, "payload_too_large")

        async def small():
            yield b'{"inputs": "good", '
            yield b'"adapter": "sst2"}'

        ok = await client.post("/classify", content=small(), headers={"Content-Type": "application/json"})
        assert ok.status_code == 200 and ok.json()["results"][0]["label"] == "positive"


async def test_client_batch_and_input_chars_limits(tmp_path):
    app, _ = make_app(tmp_path, max_client_batch=4, max_input_chars=50)
    async with running(app) as client:
        assert_envelope(await client.post("/classify", json={"inputs": ["a"] * 5}), 413, "payload_too_large")
        body = assert_envelope(
            await client.post("/classify", json={"inputs": ["a", "b" * 51]}), 413, "payload_too_large"
        )
        assert "b" * 20 not in body["error"]
        assert (await client.post("/classify", json={"inputs": ["a"] * 4})).status_code == 200
        assert (await client.post("/classify", json={"inputs": "b" * 50})).status_code == 200


async def test_input_too_long_without_truncation(tmp_path):
    app, _ = make_app(tmp_path)
    async with running(app) as client:
        long = " ".join(["w"] * 40)
        response = await client.post("/classify", json={"inputs": long, "truncate": False})
        assert_envelope(response, 413, "input_too_long")
        assert (await client.post("/classify", json={"inputs": long})).status_code == 200


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"[]",
        b'"just a string"',
        b'{"inputs": 5}',
        b'{"inputs": [1, 2]}',
        b'{"inputs": []}',
        b'{"inputs": null}',
        b'{"inputs": "x", "threshold": 1.5}',
        b'{"inputs": "x", "threshold": -0.1}',
        b'{"inputs": "x", "threshold": "0.5"}',
        b'{"inputs": "x", "truncate": "yes"}',
        b'{"inputs": "x", "adapter": 3}',
        b'{"inputs": "x", "unexpected": true}',
        b'{"text": "x"}',
        b'{"inputs": "\\ud800"}',
        b'{"inputs": "x", "threshold": NaN}',
        b'{"inputs": "x", "threshold": Infinity}',
        b'{"inputs": ["ok", null]}',
        b"[" * 100_000 + b"]" * 100_000,
        b"\xff\xfe not utf-8",
    ],
)
async def test_malformed_requests_are_422(tmp_path, content):
    app, _ = make_app(tmp_path)
    async with running(app) as client:
        response = await client.post("/classify", content=content, headers={"Content-Type": "application/json"})
        body = assert_envelope(response, 422, "invalid_request")
        assert "/" not in body["error"] and ".py" not in body["error"]
        await still_answers(client)


async def test_validation_message_never_echoes_huge_input(tmp_path):
    app, _ = make_app(tmp_path)
    secret = "Z" * 5000
    async with running(app) as client:
        for payload in ({"inputs": {"nested": secret}}, {"inputs": "x", secret: 1}, {"inputs": [secret, 7]}):
            body = assert_envelope(await client.post("/classify", json=payload), 422, "invalid_request")
            assert "Z" * 50 not in body["error"]
            assert len(body["error"]) < 600


async def test_unknown_route_and_wrong_method_use_the_envelope(tmp_path):
    app, _ = make_app(tmp_path)
    async with running(app) as client:
        assert_envelope(await client.get("/nope"), 404, "not_found")
        assert_envelope(await client.get("/classify"), 405, "method_not_allowed")
        assert_envelope(await client.put("/health"), 405, "method_not_allowed")
        await still_answers(client)


async def test_queue_full_is_immediate_503_with_retry_after(tmp_path):
    app, factory = make_app(tmp_path, max_queue=4)
    async with running(app) as client:
        batcher = factory.made["batcher"]
        batcher.gate.clear()
        held = asyncio.create_task(client.post("/classify", json={"inputs": ["good"] * 3}))
        while batcher.queue_depth < 3:
            await asyncio.sleep(0)
        # answered while the batcher still holds the first request: the rejection does not wait
        response = await client.post("/classify", json={"inputs": ["a", "b"]})
        assert_envelope(response, 503, "queue_full")
        assert response.headers["retry-after"] == "2"
        assert not held.done()
        batcher.gate.set()
        assert (await held).status_code == 200
        await still_answers(client)


async def test_timeout_is_504(tmp_path):
    app, factory = make_app(tmp_path, request_timeout_s=0.05)
    async with running(app) as client:
        batcher = factory.made["batcher"]
        batcher.gate.clear()
        assert_envelope(await client.post("/classify", json={"inputs": "x"}), 504, "timeout")
        assert batcher.inflight == 0  # the timed-out submit was cancelled, not leaked
        batcher.gate.set()
        await still_answers(client)


async def test_not_ready_while_loading_then_ready(tmp_path):
    hold = asyncio.Event()
    app, _ = make_app(tmp_path, hold=hold)
    async with running(app, wait_ready=False) as client:
        assert (await client.get("/health")).status_code == 200
        response = await client.get("/ready")
        assert_envelope(response, 503, "not_ready")
        assert "retry-after" in response.headers
        assert_envelope(await client.post("/classify", json={"inputs": "x"}), 503, "not_ready")
        assert_envelope(await client.get("/adapters"), 503, "not_ready")
        hold.set()
        await asyncio.wait_for(app.state.service.ready_event.wait(), 10)
        assert (await client.get("/ready")).json() == {"status": "ready"}
        await still_answers(client)


async def test_failed_loading_keeps_ready_503_and_health_200(tmp_path):
    async def broken(settings, listener):
        raise ValueError("checkpoint /secret/path is broken")

    app = create_app(Settings(model_dir=tmp_path), components=broken)
    async with running(app, wait_ready=False) as client:
        await asyncio.wait_for(app.state.service.ready_event.wait(), 10)
        body = assert_envelope(await client.get("/ready"), 503, "not_ready")
        assert "secret" not in body["error"]
        assert (await client.get("/health")).status_code == 200
        assert_envelope(await client.post("/classify", json={"inputs": "x"}), 503, "not_ready")


async def test_draining_turns_ready_503_and_rejects_new_work(tmp_path):
    app, factory = make_app(tmp_path)
    async with running(app) as client:
        batcher = factory.made["batcher"]
        batcher.gate.clear()
        accepted = asyncio.create_task(client.post("/classify", json={"inputs": "good"}))
        while batcher.inflight < 1:
            await asyncio.sleep(0)
        app.state.service.begin_drain()
        assert_envelope(await client.get("/ready"), 503, "not_ready")
        response = await client.post("/classify", json={"inputs": "x"})
        assert_envelope(response, 503, "shutting_down")
        assert "retry-after" in response.headers
        assert (await client.get("/health")).status_code == 200
        batcher.gate.set()
        assert (await accepted).status_code == 200
    assert batcher.stopped


async def test_adapters_listing(tmp_path):
    app, _ = make_app(tmp_path, names=("sst2", "agnews"))
    async with running(app) as client:
        adapters = (await client.get("/adapters")).json()["adapters"]
        assert sorted(a["name"] for a in adapters) == ["agnews", "sst2"]
        for adapter in adapters:
            assert {"name", "base_model", "labels", "method", "tau", "metrics"} <= set(adapter)
            assert adapter["metrics"] == {"dev_accuracy": 0.9}


async def test_admin_load_and_unload(tmp_path):
    app, _ = make_app(tmp_path, available=("extra",), admin_key=ADMIN_KEY)
    async with running(app) as client:
        client.headers["X-API-Key"] = ADMIN_KEY
        assert_envelope(
            await client.post("/classify", json={"inputs": "x", "adapter": "extra"}), 404, "unknown_adapter"
        )
        loaded = await client.post("/adapters/extra")
        assert loaded.status_code == 201 and loaded.json()["name"] == "extra"
        assert_envelope(await client.post("/adapters/extra"), 409, "adapter_conflict")
        assert (await client.post("/classify", json={"inputs": "good", "adapter": "extra"})).status_code == 200
        assert_envelope(await client.post("/adapters/absent"), 404, "unknown_adapter")
        unloaded = await client.delete("/adapters/extra")
        assert unloaded.status_code == 200 and unloaded.json() == {"name": "extra", "status": "unloaded"}
        assert_envelope(await client.delete("/adapters/extra"), 404, "unknown_adapter")
        assert_envelope(
            await client.post("/classify", json={"inputs": "x", "adapter": "extra"}), 404, "unknown_adapter"
        )
        await still_answers(client)


@pytest.mark.parametrize("name", ["..", ".hidden", "a" * 65, "bad name", "a%2F..%2F..", "-x", "%00"])
async def test_admin_rejects_bad_names(tmp_path, name):
    app, _ = make_app(tmp_path, available=("extra",), admin_key=ADMIN_KEY)
    (tmp_path.parent / "outside").mkdir(exist_ok=True)
    async with running(app) as client:
        client.headers["X-API-Key"] = ADMIN_KEY
        response = await client.post(f"/adapters/{name}")
        # ".." is resolved by the client to POST / (the console's page, GET only): 405.
        assert response.status_code in (404, 405, 422), response.text
        assert_envelope(response, response.status_code, response.json()["error_type"])
        assert app.state.service.repository.loaded.keys() == {"sst2"}
        await still_answers(client)


async def test_admin_path_escape_is_not_loaded(tmp_path):
    app, _ = make_app(tmp_path / "models", available=(), admin_key=ADMIN_KEY)
    (tmp_path / "models").mkdir()
    (tmp_path / "outside").mkdir()
    async with running(app) as client:
        client.headers["X-API-Key"] = ADMIN_KEY
        for path in ("/adapters/../outside", "/adapters/..%2Foutside", "/adapters/%2E%2E"):
            response = await client.post(path)
            assert response.status_code in (404, 405, 422), (path, response.text)
            assert set(response.json()) == {"error", "error_type"}
        assert app.state.service.repository.loaded.keys() == {"sst2"}


async def test_access_log_has_one_line_per_request_without_text(tmp_path, caplog):
    app, _ = make_app(tmp_path)
    secret = "confidential words here"
    async with running(app) as client:
        with caplog.at_level(logging.DEBUG):
            response = await client.post("/classify", json={"inputs": [secret, "good"], "adapter": "sst2"})
    request_id = response.headers["x-request-id"]
    access = [r for r in caplog.records if r.name == "cogalora.access" and r.request_id == request_id]
    assert len(access) == 1
    record = access[0]
    assert (record.status, record.adapter, record.inputs, record.path) == (200, "sst2", 2, "/classify")
    assert record.latency_ms >= 0
    assert all(secret not in r.getMessage() and secret not in str(r.__dict__) for r in caplog.records)


def test_settings_defaults_and_cogalora_env(monkeypatch):
    for key in [key for key in os.environ if key.startswith("COGALORA_")]:
        monkeypatch.delenv(key)
    defaults = Settings()
    assert (defaults.host, defaults.port, defaults.max_queue) == ("0.0.0.0", 8000, 1024)
    assert (defaults.max_batch_size, defaults.max_batch_tokens, defaults.max_wait_ms) == (32, 8192, 0.0)
    assert (defaults.max_client_batch, defaults.max_input_chars, defaults.max_body_bytes) == (64, 10_000, 1 << 20)
    assert (defaults.request_timeout_s, defaults.device, defaults.torch_threads) == (30.0, "cpu", 0)
    assert (defaults.api_key_value(), defaults.log_format) == (None, "text")
    assert defaults.model_dir == DEFAULT_MODEL_DIR and DEFAULT_MODEL_DIR.name == "models"
    assert DEFAULT_MODEL_DIR.parent == Path(service.__file__).resolve().parents[1]

    monkeypatch.setenv("COGALORA_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("COGALORA_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("COGALORA_API_KEY", "k")
    monkeypatch.setenv("COGALORA_LOG_FORMAT", "json")
    monkeypatch.setenv("COGALORA_DEVICE", "auto")
    settings = Settings()
    assert (settings.max_batch_size, settings.max_wait_ms, settings.api_key_value()) == (7, 2.5, "k")
    assert settings.log_format == "json"
    assert settings.resolved_device() in ("cpu", "cuda")
    monkeypatch.setenv("COGALORA_LOG_FORMAT", "xml")
    with pytest.raises(ValueError):
        Settings()


def test_make_batcher_maps_settings():
    from service.engine_core import make_batcher

    settings = Settings(max_batch_size=3, max_batch_tokens=99, max_wait_ms=7, max_queue=11, request_timeout_s=4)
    config = make_batcher(SimpleNamespace(repository=None), settings, listener=None).config
    assert (config.max_batch_size, config.max_batch_tokens, config.max_queue) == (3, 99, 11)
    assert config.max_wait_s == pytest.approx(0.007)
    assert config.request_timeout_s == 4


async def test_openapi_documents_schemas_and_the_error_envelope(tmp_path):
    app, _ = make_app(tmp_path)
    async with running(app) as client:
        assert (await client.get("/docs")).status_code == 200
        spec = (await client.get("/openapi.json")).json()
    classify = spec["paths"]["/classify"]["post"]
    assert classify["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ClassifyBody")
    for code in ("401", "404", "413", "422", "503", "504"):
        assert classify["responses"][code]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert {"/health", "/ready", "/adapters", "/adapters/{name}", "/metrics"} <= set(spec["paths"])
    assert "HTTPValidationError" not in json.dumps(spec["paths"])


def test_json_log_lines_carry_extra_fields(capsys):
    from service.logs import configure_logging

    configure_logging("json", "INFO")
    try:
        logging.getLogger("cogalora.access").info("GET /x 200", extra={"request_id": "r1", "status": 200})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        entry = json.loads(line)
        assert entry["msg"] == "GET /x 200" and entry["request_id"] == "r1" and entry["status"] == 200
        assert entry["level"] == "INFO" and entry["logger"] == "cogalora.access" and "ts" in entry
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)


def test_auto_threads_leave_one_core_to_the_api_process_and_share_the_rest_among_lanes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert Settings().resolved_engine_lanes() == 2
    assert Settings().resolved_torch_threads() == 3, "7 cores shared by 2 lanes"
    assert Settings(engine_lanes=1).resolved_torch_threads() == 7
    assert Settings(torch_threads=2).resolved_torch_threads() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert (Settings().resolved_engine_lanes(), Settings().resolved_torch_threads()) == (2, 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert (Settings().resolved_engine_lanes(), Settings().resolved_torch_threads()) == (1, 1)


def test_auto_engine_processes_run_one_lane_each_with_the_threads_resolved_for_all(monkeypatch):
    from service.lifecycle import engine_settings

    def payload(**options) -> tuple[int, int, int]:
        settings = Settings(**options)
        built = engine_settings(settings)
        return settings.resolved_engine_processes(), built["engine_lanes"], built["torch_threads"]

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert payload() == (2, 1, 3), "two processes of one lane, 7 cores shared among the lanes"
    assert payload(engine_processes=1) == (1, 2, 3), "one process running both lanes"
    assert payload(engine_lanes=4, engine_processes=2) == (2, 2, 1)
    assert payload(engine_processes=5) == (2, 1, 3), "never more processes than lanes"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert payload() == (2, 1, 1)
    assert payload(device="cpu", engine_lanes=1) == (1, 1, 1)
    assert "api_key" not in engine_settings(Settings(api_key="secret")), "the engine gets no secrets"
