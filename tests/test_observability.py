"""Every Grafana dashboard query returns data against a real Prometheus scraping the real service under load.

Starts ``python -m service`` on the MiniLM model repository and ``prometheus`` scraping it every
second, runs a short bounded load test through ``benchmarks.loadtest``, waits (polling, with a
deadline) until Prometheus holds the service's final request count, then evaluates every PromQL
expression of docker/grafana/dashboards/cogalora.json through Prometheus's HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest
from processes import (
    REPO,
    PrometheusProcess,
    metric_sum,
    prometheus_binary,
    wait_until,
)

from benchmarks.loadtest import LoadTestConfig, parse_adapter_mix, run_load
from benchmarks.texts import SAMPLE_TEXTS

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "cogalora.json"
ADAPTERS = ("sst2", "agnews", "plain")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(prometheus_binary() is None, reason="prometheus is not on PATH (apt-get install prometheus)"),
]

# What Grafana substitutes into the queries; the whole test runs within a few minutes.
GRAFANA_VARIABLES = {
    "$__rate_interval": "2m",
    "$__interval": "5s",
    "$__range": "10m",
}


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query target, including panels nested in rows."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


def substitute(expr: str, adapter_regex: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    expr = expr.replace("${adapter}", adapter_regex).replace("$adapter", adapter_regex)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
    return expr


@pytest.fixture(scope="module")
def stack(minilm_model_dir: Path, tmp_path_factory, start_service):
    workdir = tmp_path_factory.mktemp("observability")
    service = start_service(minilm_model_dir, wait=False)
    prometheus = PrometheusProcess(workdir, "cogalora", [f"127.0.0.1:{service.port}"], scrape_interval="1s")
    try:
        prometheus.wait_ready()
        service.wait_ready()
        yield service, prometheus
    finally:
        prometheus.stop()
        service.stop()


def _post(url: str, payload: dict) -> httpx.Response:
    return httpx.post(f"{url}/classify", json=payload, timeout=60, trust_env=False)


def _wait_for_scrape(service_url: str, prometheus: PrometheusProcess) -> float:
    """Poll until Prometheus holds the service's current request and input counts; returns the former."""
    text = httpx.get(f"{service_url}/metrics", timeout=10, trust_env=False).text
    requests = metric_sum(text, "cogalora_requests_total")
    inputs = metric_sum(text, "cogalora_inputs_total")

    def scraped() -> bool:
        return (
            prometheus.scalar("sum(cogalora_requests_total)") == requests
            and prometheus.scalar("sum(cogalora_inputs_total)") == inputs
        )

    wait_until(scraped, timeout=60, what=f"prometheus holding the service's count {requests:.0f}")
    return requests


def drive_load(service_url: str, prometheus: PrometheusProcess) -> dict:
    """Prime every series, let Prometheus see it, run a load that spans several scrapes, wait for the final scrape.

    Counters that appear and finish within one scrape have no rate; priming first makes every
    adapter's series exist before the load, and the open-loop schedule (60 arrivals at 15/s)
    lasts at least 4 s, i.e. several 1 s scrapes, however fast the service is.
    Returns the load-test report plus ``primed`` (the priming responses' active adapters per adapter).
    """
    wait_until(
        lambda: prometheus.scalar('up{job="cogalora"}') == 1.0, timeout=60, what="prometheus scraping the service"
    )
    primed: dict[str, list[int]] = {}
    for adapter in ADAPTERS:
        response = _post(service_url, {"inputs": SAMPLE_TEXTS[0], "adapter": adapter})
        assert response.status_code == 200, response.text
        primed[adapter] = [result["active_adapters"] for result in response.json()["results"]]
    # A client error, so that the status-code panels carry a non-2xx series too.
    assert _post(service_url, {"inputs": "x", "adapter": "missing"}).status_code == 404
    _wait_for_scrape(service_url, prometheus)

    config = LoadTestConfig(
        url=service_url,
        rate=15.0,
        arrival="constant",
        requests=60,
        batch=2,
        adapter_mix=parse_adapter_mix("sst2=0.5,agnews=0.3,plain=0.2"),
        progress=False,
        timeout=60.0,
    )
    report = asyncio.run(run_load(config))
    assert report["requests"]["ok"] == 60, report["error_counts"]
    assert _post(service_url, {"inputs": "x", "adapter": "missing"}).status_code == 404
    _wait_for_scrape(service_url, prometheus)
    report["primed"] = primed
    return report


@pytest.fixture(scope="module")
def loaded(stack):
    service, prometheus = stack
    return service, prometheus, drive_load(service.url, prometheus)


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
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    expressions = dashboard_expressions(dashboard)
    assert len(expressions) >= 20
    empty, not_finite = [], []
    for title, expr in expressions:
        query = substitute(expr, adapter_regex)
        result = prometheus.query(query)
        samples = result["result"]
        if result["resultType"] == "scalar":
            samples = [{"value": result["result"]}]
        if not samples:
            empty.append(f"{title}: {query}")
            continue
        values = [float(sample["value"][1]) for sample in samples]
        if not any(math.isfinite(value) for value in values):
            not_finite.append(f"{title}: {query} -> {values}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert not not_finite, "queries with only NaN/Inf:\n" + "\n".join(not_finite)


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
    # Mean active adapters from the histogram equals the mean over every response the clients got.
    primed = [count for counts in report["primed"].values() for count in counts]
    seen = report["active_adapters"]["mean"] * report["inputs"]["ok"] + sum(primed)
    mean = prometheus.scalar("sum(cogalora_active_adapters_sum) / sum(cogalora_active_adapters_count)")
    assert mean == pytest.approx(seen / (report["inputs"]["ok"] + len(primed)), rel=1e-9)
