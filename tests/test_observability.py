"""Every Grafana dashboard query returns data against a real Prometheus scraping the real service under load.

Starts ``python -m service`` on the MiniLM model repository and ``prometheus`` scraping it every
second, runs a short bounded load test through ``benchmarks.loadtest``, waits (polling, with a
deadline) until Prometheus holds the service's final request count, then evaluates every PromQL
expression of docker/grafana/dashboards/cogalora.json through Prometheus's HTTP API.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from dashboard import dashboard_expressions, drive_load, queries_without_data, substitute
from processes import PrometheusProcess, prometheus_binary

ADAPTERS = ("sst2", "agnews", "plain")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(prometheus_binary() is None, reason="prometheus is not on PATH (apt-get install prometheus)"),
]


@pytest.fixture(scope="module")
def stack(minilm_model_dir: Path, tmp_path_factory, start_service):
    workdir = tmp_path_factory.mktemp("observability")
    # Every routed row shadowed and a short drift window: the fidelity panels get data from a short load.
    service = start_service(minilm_model_dir, wait=False, COGALORA_SHADOW_FRACTION="1", COGALORA_DRIFT_WINDOW="10")
    prometheus = PrometheusProcess(workdir, "cogalora", [f"127.0.0.1:{service.port}"], scrape_interval="1s")
    try:
        prometheus.wait_ready()
        service.wait_ready()
        yield service, prometheus
    finally:
        prometheus.stop()
        service.stop()


@pytest.fixture(scope="module")
def loaded(stack):
    service, prometheus = stack
    return service, prometheus, drive_load(service.url, prometheus, "sst2=0.5,agnews=0.3,plain=0.2")


def test_variable_query_lists_the_adapters(loaded):
    _, prometheus, _ = loaded
    response = httpx.get(
        f"{prometheus.url}/api/v1/label/adapter/values",
        params={"match[]": "cogalora_requests_total"},
        timeout=10,
        trust_env=False,
    )
    values = set(response.json()["data"])
    assert set(ADAPTERS) <= values, values


@pytest.mark.parametrize("adapter_regex", [".*", "sst2", "(agnews|plain)"], ids=["all", "sst2", "agnews+plain"])
def test_every_dashboard_query_returns_data(loaded, adapter_regex: str):
    _, prometheus, _ = loaded
    assert len(dashboard_expressions()) >= 20
    problems = queries_without_data(prometheus, adapter_regex)
    assert not problems, "queries without data:\n" + "\n".join(problems)


def test_dashboard_numbers_agree_with_the_load(loaded):
    """Spot checks that the panels measure what they claim, not just that they return something."""
    _, prometheus, report = loaded
    # Plain LoRA runs every module: activation rate 1 everywhere and no FLOPs saved.
    plain_rates = prometheus.query(
        substitute(
            'sum by (layer, module) (increase(cogalora_module_activations_total{adapter=~"$adapter"}[$__range])) / '
            'scalar(sum(increase(cogalora_inputs_total{adapter=~"$adapter"}[$__range])))',
            "plain",
        )
    )["result"]
    assert len(plain_rates) == 36
    assert all(float(sample["value"][1]) == pytest.approx(1.0, rel=1e-6) for sample in plain_rates)
    assert prometheus.scalar('sum(cogalora_adapter_flops_saved_total{adapter="plain"})') == 0.0
    # Inputs counted by the server equal what the priming and the load test got answered, per adapter.
    for name in ADAPTERS:
        stats = report["per_adapter"].get(name, {"inputs_ok": 0})
        expected = stats["inputs_ok"] + len(report["primed"][name])
        assert prometheus.scalar(f'sum(cogalora_inputs_total{{adapter="{name}"}})') == expected, name
        truncated = prometheus.scalar(f'sum(cogalora_truncated_inputs_total{{adapter="{name}"}})')
        assert truncated == report["truncated"][name] == 1, name
    # Mean active adapters from the histogram equals the mean over every response the clients got.
    primed = [count for counts in report["primed"].values() for count in counts]
    seen = report["active_adapters"]["mean"] * report["inputs"]["ok"] + sum(primed)
    mean = prometheus.scalar("sum(cogalora_active_adapters_sum) / sum(cogalora_active_adapters_count)")
    assert mean == pytest.approx(seen / (report["inputs"]["ok"] + len(primed)), rel=1e-9)
    # Shadow fraction 1: every input of a routed adapter had exactly one dense check; plain LoRA none.
    for name in ("sst2", "agnews"):
        inputs = prometheus.scalar(f'sum(cogalora_inputs_total{{adapter="{name}"}})')
        assert prometheus.scalar(f'sum(cogalora_shadow_rows_total{{adapter="{name}"}})') == inputs, name
    assert prometheus.scalar('sum(cogalora_shadow_rows_total{adapter="plain"})') is None
    assert prometheus.scalar('max(cogalora_routing_drift{adapter="sst2"})') is not None
