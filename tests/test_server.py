"""A real ``python -m service`` process on the packaged MiniLM: end to end, JSON logs, and SIGTERM draining."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest
from processes import API_KEY, burst_across_a_stop, metric_sum

pytestmark = pytest.mark.integration


def test_real_server_end_to_end(keyed_service):
    server = keyed_service
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as client:
        assert client.get("/health").json() == {"status": "ok"}
        before = client.get("/metrics").text
        assert client.get("/classify").status_code == 401
        assert client.get("/classify", headers=auth).status_code == 405
        assert client.post("/classify", json={"inputs": "x", "adapter": "sst2"}).status_code == 401

        adapters = {a["name"]: a for a in client.get("/adapters", headers=auth).json()["adapters"]}
        assert set(adapters) == {"sst2", "agnews", "plain"}
        assert adapters["agnews"]["labels"] == ["World", "Sports", "Business", "Sci/Tech"]
        assert adapters["plain"]["method"] == "lora"

        texts = ["a wonderful, moving film", "the plot made no sense at all", "ok"]
        response = client.post("/classify", json={"inputs": texts, "adapter": "sst2"}, headers=auth)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["adapter"] == "sst2" and len(body["results"]) == 3
        for row in body["results"]:
            assert row["label"] in ("negative", "positive")
            assert row["score"] == max(entry["score"] for entry in row["scores"])
            assert sum(entry["score"] for entry in row["scores"]) == pytest.approx(1.0, abs=1e-4)
            assert row["total_adapters"] == 36
            assert row["active_adapters"] == len(row["active_modules"])
            assert all(site.startswith("layer.") for site in row["active_modules"])
            assert row["tokens"] >= 3
        for header in ("x-request-id", "x-queue-time-ms", "x-inference-time-ms"):
            assert header in response.headers
        request_id = response.headers["x-request-id"]

        solo = client.post("/classify", json={"inputs": texts[1], "adapter": "sst2"}, headers=auth).json()
        assert solo["results"][0]["label"] == body["results"][1]["label"]
        assert solo["results"][0]["active_modules"] == body["results"][1]["active_modules"]

        missing = client.post("/classify", json={"inputs": "x", "adapter": "nope"}, headers={"X-API-Key": API_KEY})
        assert missing.status_code == 404 and missing.json()["error_type"] == "unknown_adapter"
        assert client.get("/docs").status_code == 200
        assert "/classify" in client.get("/openapi.json").json()["paths"]

        metrics = client.get("/metrics").text

        def moved(name: str, **labels: str) -> float:  # the service is shared with other tests
            return metric_sum(metrics, name, **labels) - metric_sum(before, name, **labels)

        assert moved("cogalora_requests_total", adapter="sst2", code="200") == 2
        assert moved("cogalora_inputs_total", adapter="sst2") == 4
        assert metric_sum(metrics, "cogalora_adapters_loaded") == 3
        active = sum(row["active_adapters"] for row in body["results"] + solo["results"])
        assert moved("cogalora_active_adapters_sum", adapter="sst2") == active

    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "cogalora.access" and line["request_id"] == request_id]
    assert len(access) == 1
    assert (access[0]["status"], access[0]["adapter"], access[0]["inputs"]) == (200, "sst2", 3)
    assert "latency_ms" in access[0]
    assert "wonderful" not in server.log_text()


async def test_sigterm_finishes_every_accepted_request(minilm_model_dir, start_service):
    """A burst is accepted, SIGTERM arrives while it is queued: every accepted request is answered, then exit."""
    process = start_service(
        minilm_model_dir, COGALORA_MAX_BATCH_SIZE="2", COGALORA_MAX_WAIT_MS="0", COGALORA_LOG_LEVEL="INFO"
    )
    try:
        texts = [f"review number {i}: {'great' if i % 2 else 'dull'} acting and a long, winding plot" for i in range(8)]
        payload = {"inputs": texts, "adapter": "agnews"}
        reference = httpx.post(f"{process.url}/classify", json=payload, timeout=60, trust_env=False).json()

        async def terminate(client: httpx.AsyncClient) -> None:
            os.kill(process.proc.pid, signal.SIGTERM)
            try:  # after the signal: either the listener is closed or the server says it is draining
                late = await client.get("/ready")
                assert late.status_code == 503 and late.json()["error_type"] == "not_ready"
            except httpx.TransportError:
                pass

        burst = 24
        responses, inflight = await burst_across_a_stop(process.url, payload, burst, terminate)
        assert inflight > 0, "the burst finished before the signal; nothing was drained"
        assert [r.status_code for r in responses] == [200] * burst
        expected = [(row["label"], row["active_modules"]) for row in reference["results"]]
        for response in responses:
            rows = response.json()["results"]
            assert [(row["label"], row["active_modules"]) for row in rows] == expected
            for row, ref in zip(rows, reference["results"], strict=True):
                assert row["score"] == pytest.approx(ref["score"], abs=1e-4)
        assert process.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = process.log_text()
        assert "draining" in log and "stopped" in log
        assert "Traceback" not in log
    finally:
        process.stop()
