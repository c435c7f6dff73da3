"""The HTTP load tester: its statistics on synthetic data, and real runs against the real service."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import REPO, ServiceProcess, metric_sum

from benchmarks.loadtest import (
    ERROR,
    OK,
    REJECTED,
    LoadTestConfig,
    RequestRecord,
    _Plan,
    build_report,
    check_loopback,
    classify_response,
    exit_code,
    parse_adapter_mix,
    percentile,
    read_texts,
    run_load,
)
from benchmarks.texts import SAMPLE_TEXTS

# ---- unit tests: statistics and parsing -------------------------------------------------------


def test_percentile_matches_numpy_linear():
    rng = random.Random(3)
    for size in (1, 2, 3, 10, 101, 1000):
        values = [rng.expovariate(5.0) for _ in range(size)]
        for q in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q, method="linear")), rel=1e-12)


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0  # unsorted input
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _record(outcome: str, latency: float, status: int | None, adapter: str | None = "sst2", inputs: int = 1, **kw):
    error = kw.pop("error", None if outcome != ERROR else f"http_{status}")
    return RequestRecord(kw.pop("start", 0.0), latency, adapter, inputs, status, outcome, error, **kw)


def test_report_counts_and_throughput_on_synthetic_records():
    records = [_record(OK, 0.01 * (i + 1), 200, active_adapters=[i % 5], total_adapters=[36]) for i in range(100)]
    records += [
        _record(OK, 0.5, 200, adapter="agnews", inputs=4, active_adapters=[1, 2, 3, 4], total_adapters=[36] * 4)
    ]
    records += [_record(REJECTED, 0.001, 503), _record(REJECTED, 0.002, 429)]
    records += [_record(ERROR, 0.2, 500), _record(ERROR, 0.3, None, error="transport:ReadTimeout")]
    report = build_report(records, wall_time_s=10.0)

    counts = report["requests"]
    assert counts == {"sent": 105, "answered": 104, "ok": 101, "rejected": 2, "errors": 2, "transport_errors": 1}
    assert counts["ok"] + counts["rejected"] + counts["errors"] == counts["sent"]
    assert counts["answered"] + counts["transport_errors"] == counts["sent"]
    assert report["status_counts"] == {"200": 101, "429": 1, "500": 1, "503": 1}
    assert report["error_counts"] == {"http_500": 1, "transport:ReadTimeout": 1}
    assert report["inputs"] == {"sent": 108, "ok": 104}
    assert report["throughput"]["requests_per_s"] == pytest.approx(10.1)
    assert report["throughput"]["inputs_per_s"] == pytest.approx(10.4)

    ok_latencies = [r.latency for r in records if r.outcome == OK]
    latency = report["latency_s"]
    assert latency["count"] == 101
    assert latency["p50"] == pytest.approx(float(np.percentile(ok_latencies, 50)))
    assert latency["p99"] == pytest.approx(float(np.percentile(ok_latencies, 99)))
    assert latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert latency["mean"] == pytest.approx(sum(ok_latencies) / 101)

    active = [i % 5 for i in range(100)] + [1, 2, 3, 4]
    assert report["active_adapters"]["mean"] == pytest.approx(sum(active) / len(active))
    assert report["active_adapters"]["total_adapters_mean"] == 36
    assert report["per_adapter"]["agnews"]["inputs_ok"] == 4
    assert report["per_adapter"]["agnews"]["active_adapters_mean"] == pytest.approx(2.5)
    assert sum(stats["sent"] for stats in report["per_adapter"].values()) == 105
    assert report["passed"] is False
    assert exit_code(report) == 1


def test_exit_code_rejections_and_empty_runs():
    clean = build_report([_record(OK, 0.1, 200), _record(REJECTED, 0.1, 503)], 1.0)
    assert clean["passed"] is True
    assert exit_code(clean) == 0
    assert exit_code(clean, fail_on_reject=True) == 2
    nothing_ok = build_report([_record(REJECTED, 0.1, 503)], 1.0)
    assert exit_code(nothing_ok) == 1
    empty = build_report([], 1.0)
    assert empty["latency_s"]["p50"] is None and exit_code(empty) == 1


def test_classify_response():
    body = {"results": [{"label": "positive", "active_adapters": 3, "total_adapters": 36}]}
    assert classify_response(200, body, 1) == (OK, None, [3], [36])
    assert classify_response(200, body, 2)[:2] == (ERROR, "bad_response")  # one result for two inputs
    assert classify_response(200, {"results": [{"score": 1.0}]}, 1)[:2] == (ERROR, "bad_response")
    assert classify_response(200, None, 1)[:2] == (ERROR, "bad_response")
    assert classify_response(503, {"error": "full"}, 1)[0] == REJECTED
    assert classify_response(429, None, 1)[0] == REJECTED
    assert classify_response(404, {"error": "x"}, 1)[:2] == (ERROR, "http_404")
    assert classify_response(504, None, 1)[:2] == (ERROR, "http_504")


def test_parse_adapter_mix():
    assert parse_adapter_mix("sst2=0.7,agnews=0.3") == [("sst2", 0.7), ("agnews", 0.3)]
    assert parse_adapter_mix(" sst2 , agnews=2 ") == [("sst2", 1.0), ("agnews", 2.0)]
    assert parse_adapter_mix(None) == [(None, 1.0)]
    assert parse_adapter_mix("none") == [(None, 1.0)]
    for bad in ("sst2=x", "=0.5", "sst2=-1", "sst2=0", "a=nan"):
        with pytest.raises(ValueError):
            parse_adapter_mix(bad)


def test_loopback_only_and_bounded():
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "http://127.1.2.3"):
        check_loopback(url)
    for url in ("http://10.0.0.1:8000", "http://192.168.1.5", "http://8.8.8.8", "ftp://127.0.0.1", "127.0.0.1:80"):
        with pytest.raises(ValueError):
            check_loopback(url)
    with pytest.raises(ValueError, match="bounded"):
        LoadTestConfig().validate()


def test_a_batch_range_draws_every_size_in_it_and_always_sends_a_list():
    plan = _Plan(LoadTestConfig(requests=1, batch=1, batch_max=4, texts=("a", "b")))
    sizes = [len(plan.next()[1]["inputs"]) for _ in range(400)]
    assert set(sizes) == {1, 2, 3, 4}
    assert isinstance(_Plan(LoadTestConfig(requests=1, batch=1, batch_max=1)).next()[1]["inputs"], list)
    assert _Plan(LoadTestConfig(requests=1)).next()[1]["inputs"] in SAMPLE_TEXTS, "no range: one text, as before"
    with pytest.raises(ValueError, match="batch-max"):
        LoadTestConfig(requests=1, batch=3, batch_max=2).validate()


def test_read_texts(tmp_path: Path):
    path = tmp_path / "texts.txt"
    path.write_text("one\n\n  two  \n", encoding="utf-8")
    assert read_texts(path) == ["one", "two"]
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError):
        read_texts(path)


# ---- integration: the real service -------------------------------------------------------------


@pytest.fixture(scope="module")
def service(minilm_model_dir: Path, start_service) -> ServiceProcess:
    process = start_service(minilm_model_dir)
    yield process
    process.stop()


def _assert_consistent(report: dict, sent: int, inputs_per_request: int) -> None:
    counts = report["requests"]
    assert counts["sent"] == sent
    assert counts["answered"] == sent, report["error_counts"]
    assert counts["ok"] == sent, (report["status_counts"], report["error_counts"])
    assert counts["errors"] == 0 and counts["rejected"] == 0 and counts["transport_errors"] == 0
    assert report["status_counts"] == {"200": sent}
    assert report["inputs"] == {"sent": sent * inputs_per_request, "ok": sent * inputs_per_request}
    latency = report["latency_s"]
    assert latency["count"] == sent
    assert 0 < latency["min"] <= latency["p50"] <= latency["p90"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert report["throughput"]["requests_per_s"] == pytest.approx(sent / report["wall_time_s"])
    assert report["throughput"]["inputs_per_s"] == pytest.approx(sent * inputs_per_request / report["wall_time_s"])
    assert sum(stats["sent"] for stats in report["per_adapter"].values()) == sent
    assert report["passed"] is True and exit_code(report) == 0


@pytest.mark.integration
async def test_closed_loop_against_service(service: ServiceProcess):
    before = service.metrics_text()
    config = LoadTestConfig(
        url=service.url,
        concurrency=6,
        requests=48,
        adapter_mix=parse_adapter_mix("sst2=0.5,agnews=0.3,plain=0.2"),
        progress=False,
        timeout=60.0,
    )
    report = await run_load(config)
    _assert_consistent(report, sent=48, inputs_per_request=1)

    # Mean active adapters is a real per-input count: within [0, total]; plain LoRA runs all of them.
    active = report["active_adapters"]
    assert active["total_adapters_mean"] == 36
    assert 0 <= active["min"] <= active["mean"] <= active["max"] <= 36
    if "plain" in report["per_adapter"]:
        assert report["per_adapter"]["plain"]["active_adapters_mean"] == 36
    assert set(report["per_adapter"]) <= {"sst2", "agnews", "plain"}

    # The server counted exactly what the tool sent, per adapter.
    after = service.metrics_text()
    for name, stats in report["per_adapter"].items():
        served = metric_sum(after, "cogalora_requests_total", adapter=name, code="200") - metric_sum(
            before, "cogalora_requests_total", adapter=name, code="200"
        )
        assert served == stats["sent"], name


@pytest.mark.integration
async def test_open_loop_batched_against_service(service: ServiceProcess):
    before = service.metrics_text()
    config = LoadTestConfig(
        url=service.url,
        rate=40.0,
        arrival="constant",
        requests=24,
        batch=3,
        adapter_mix=parse_adapter_mix("agnews"),
        progress=False,
        timeout=60.0,
        seed=7,
    )
    report = await run_load(config)
    _assert_consistent(report, sent=24, inputs_per_request=3)
    # Constant arrivals at 40/s: the last one is scheduled at 23/40 s, so the run cannot be shorter.
    assert report["wall_time_s"] >= 23 / 40
    after = service.metrics_text()
    delta = metric_sum(after, "cogalora_inputs_total", adapter="agnews") - metric_sum(
        before, "cogalora_inputs_total", adapter="agnews"
    )
    assert delta == 72


@pytest.mark.integration
async def test_unexpected_errors_are_counted_and_fail_the_run(service: ServiceProcess):
    config = LoadTestConfig(
        url=service.url,
        concurrency=2,
        requests=20,
        adapter_mix=parse_adapter_mix("sst2=1,no-such-adapter=1"),
        progress=False,
        seed=1,
    )
    report = await run_load(config)
    counts = report["requests"]
    bad = report["per_adapter"]["no-such-adapter"]["sent"]
    assert bad > 0, "the seeded mix must pick the unknown adapter at least once"
    assert counts["sent"] == counts["answered"] == 20
    assert counts["errors"] == bad and report["error_counts"] == {"http_404": bad}
    assert counts["ok"] == 20 - bad
    assert exit_code(report) == 1


@pytest.mark.integration
def test_cli_writes_report_and_plot(service: ServiceProcess, tmp_path: Path):
    output, png = tmp_path / "report.json", tmp_path / "latency.png"
    command = [
        sys.executable, "-m", "benchmarks.loadtest", "--url", service.url, "--requests", "16", "--concurrency", "4",
        "--adapter-mix", "sst2=0.5,agnews=0.5", "--batch", "2", "--output", str(output), "--plot", str(png),
        "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "p50" in done.stdout and "req/s" in done.stdout
    report = json.loads(output.read_text(encoding="utf-8"))
    _assert_consistent(report, sent=16, inputs_per_request=2)
    assert report["config"]["mode"] == "closed" and "api_key" not in report["config"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    failing = subprocess.run(
        [*command[:10], "sst2=1,missing=1", "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert failing.returncode == 1, failing.stdout + failing.stderr


# ---- the naive baseline server -----------------------------------------------------------------


@pytest.mark.integration
async def test_naive_server_answers_like_the_plain_lora_checkpoint(minilm_model_dir: Path):
    """Same request/response shape as the service, and PEFT's answer equals CoGaLoRA's plain-LoRA forward."""
    import httpx
    import torch

    from benchmarks.naive_server import checkpoint_dirs, create_app, load_adapter
    from cogalora import load_model

    assert [path.name for path in checkpoint_dirs(minilm_model_dir)] == ["agnews", "plain", "sst2"]
    adapters = {name: load_adapter(minilm_model_dir / name) for name in ("plain", "agnews")}
    texts = ["A quiet, beautifully shot film.", "Stocks rallied on Friday after the bank held rates steady."]
    transport = httpx.ASGITransport(app=create_app(adapters))
    async with httpx.AsyncClient(transport=transport, base_url="http://naive") as client:
        response = await client.post("/classify", json={"inputs": texts, "adapter": "plain"})
        assert response.status_code == 200, response.text
        body = response.json()
        single = await client.post("/classify", json={"inputs": texts[0], "adapter": "agnews"})
        assert single.status_code == 200 and len(single.json()["results"]) == 1
        assert {r["label"] for r in single.json()["results"][0]["scores"]} == {
            "World",
            "Sports",
            "Business",
            "Sci/Tech",
        }
        missing = await client.post("/classify", json={"inputs": "x", "adapter": "nope"})
        assert missing.status_code == 404 and missing.json()["error_type"] == "unknown_adapter"
        ambiguous = await client.post("/classify", json={"inputs": "x"})
        assert ambiguous.status_code == 422 and set(ambiguous.json()) == {"error", "error_type"}

    assert body["adapter"] == "plain" and len(body["results"]) == 2
    loaded = load_model(minilm_model_dir / "plain")
    encoded = loaded.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        expected = torch.softmax(loaded.model(encoded["input_ids"], encoded["attention_mask"]).logits, dim=-1)
    for row, result in enumerate(body["results"]):
        assert result["active_adapters"] == result["total_adapters"] == 36
        assert len(result["active_modules"]) == 36
        assert result["tokens"] == int(encoded["attention_mask"][row].sum())
        scores = {item["label"]: item["score"] for item in result["scores"]}
        assert result["score"] == max(scores.values()) and scores[result["label"]] == result["score"]
        for index, label in enumerate(loaded.meta.labels):
            assert scores[label] == pytest.approx(float(expected[row, index]), abs=1e-4)


@pytest.mark.integration
async def test_the_serving_benchmark_splits_a_load_s_latency_as_the_server_saw_it(service: ServiceProcess):
    """``benchmarks.serving.server_side``: between two /metrics scrapes, the mean request's parts (tokenizing,
    queued for a batch, in the engine) add up to no more than the whole request, batches hold rows."""
    from benchmarks.open_loop import run_open_loop
    from benchmarks.serving import server_side

    bodies = [json.dumps({"inputs": text, "adapter": "sst2"}) for text in SAMPLE_TEXTS[:8]]
    before = service.metrics_text()
    result = await run_open_loop(service.url, "/classify", bodies, rate=40.0, duration=1.0, seed=3)
    means = server_side(before, service.metrics_text())
    assert result.answered > 0 and result.non_2xx == 0
    assert all(value > 0 for key, value in means.items() if key != "queue_ms"), means  # no NaN: every metric found
    assert means["queue_ms"] >= 0
    assert means["tokenize_ms"] + means["queue_ms"] + means["engine_ms"] <= means["request_ms"]
    assert means["batch_size"] >= 1
    assert means["request_ms"] / 1000 <= result.latency_s["max"]  # the client waited at least that long
