"""The Grafana dashboard against a real Prometheus (no tests here): its queries, and a load that gives them data.

Used on a Prometheus started here (test_observability) and on the compose stack's (test_docker).
"""

from __future__ import annotations

import asyncio
import json
import math

import httpx
from processes import REPO, PrometheusAPI, metric_sum, wait_until

from benchmarks.loadtest import LoadTestConfig, parse_adapter_mix, run_load
from benchmarks.texts import SAMPLE_TEXTS

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "cogalora.json"

#: Longer than any adapter's max_length (words are single tokens): the priming makes one truncated input per adapter.
OVERLONG_TEXT = " ".join(["word"] * 600)

# What Grafana substitutes into the queries; each test that runs them lasts a few minutes.
GRAFANA_VARIABLES = {
    "$__rate_interval": "2m",
    "$__interval": "5s",
    "$__range": "10m",
}


def dashboard_expressions(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) of every query target, including panels nested in rows."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
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


def queries_without_data(prometheus: PrometheusAPI, adapter_regex: str = ".*") -> list[str]:
    """Every dashboard query that returns no sample, or only NaN/Inf ones ("panel: query -> why")."""
    problems = []
    for title, expr in dashboard_expressions():
        query = substitute(expr, adapter_regex)
        result = prometheus.query(query)
        samples = result["result"]
        if result["resultType"] == "scalar":
            samples = [{"value": result["result"]}]
        if not samples:
            problems.append(f"{title}: {query} -> no data")
            continue
        values = [float(sample["value"][1]) for sample in samples]
        if not any(math.isfinite(value) for value in values):
            problems.append(f"{title}: {query} -> only {values}")
    return problems


def _post(url: str, payload: dict) -> httpx.Response:
    return httpx.post(f"{url}/classify", json=payload, timeout=60, trust_env=False)


def wait_for_scrape(service_url: str, prometheus: PrometheusAPI) -> float:
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


def drive_load(service_url: str, prometheus: PrometheusAPI, adapter_mix: str, job: str = "cogalora") -> dict:
    """Prime every series, let Prometheus see it, run a load that spans several scrapes, wait for the final scrape.

    Counters that appear and finish within one scrape have no rate; priming first makes every
    adapter's series exist before the load, and waiting for the scrape of the primed counts and
    again for the final ones gives every rate two different samples, whatever the scrape interval.
    ``adapter_mix`` as for ``benchmarks.loadtest`` (``"sst2=0.5,agnews=0.5"``).
    Returns the load-test report plus ``primed`` (the priming responses' active adapters per adapter) and
    ``truncated`` (truncated priming inputs per adapter; the load's texts are all shorter than max_length).
    """
    wait_until(
        lambda: prometheus.scalar(f'up{{job="{job}"}}') == 1.0, timeout=60, what="prometheus scraping the service"
    )
    mix = parse_adapter_mix(adapter_mix)
    primed: dict[str, list[int]] = {}
    truncated: dict[str, int] = {}
    for adapter, _ in mix:
        assert adapter is not None, "name every adapter of the mix"
        response = _post(service_url, {"inputs": [SAMPLE_TEXTS[0], OVERLONG_TEXT], "adapter": adapter})
        assert response.status_code == 200, response.text
        primed[adapter] = [result["active_adapters"] for result in response.json()["results"]]
        truncated[adapter] = sum(result["truncated"] for result in response.json()["results"])
    # A client error, so that the status-code panels carry a non-2xx series too.
    assert _post(service_url, {"inputs": "x", "adapter": "missing"}).status_code == 404
    wait_for_scrape(service_url, prometheus)

    config = LoadTestConfig(
        url=service_url,
        rate=15.0,
        arrival="constant",
        requests=60,
        batch=2,
        adapter_mix=mix,
        progress=False,
        timeout=60.0,
    )
    report = asyncio.run(run_load(config))
    assert report["requests"]["ok"] == 60, report["error_counts"]
    assert _post(service_url, {"inputs": "x", "adapter": "missing"}).status_code == 404
    wait_for_scrape(service_url, prometheus)
    report["primed"] = primed
    report["truncated"] = truncated
    return report
