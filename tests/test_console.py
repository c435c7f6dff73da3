"""The web console's server side: page and files, their security headers, the key, the setting, the
live stats, and the routing facts the page draws (per-adapter site lists, per-site ranks).

The page itself runs in a real browser in test_console_browser.py.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
import torch
from api_fakes import assert_envelope, fake_components, on_engine, running
from conftest import synthetic_checkpoint, tiny_text

from cogalora import load_model
from service.app import create_app
from service.console import STATIC_FILES
from service.engine_core import build_engine
from service.lifecycle import Service
from service.live_stats import LiveStats, histogram_quantile
from service.metrics import ServiceMetrics
from service.settings import Settings

PAGES = ("/", "/console")
FILES = [f"/console/static/{name}" for name in STATIC_FILES]


def make_app(tmp_path, **overrides):
    settings = Settings(model_dir=tmp_path, **overrides)
    return create_app(settings, components=fake_components(["sst2", "agnews"]))


class _Markup(HTMLParser):
    """Every tag with its attributes, and the text inside <script> and <style> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline_code: list[str] = []
        self._inside: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._inside = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag):
        self._inside = None

    def handle_data(self, data):
        if self._inside and data.strip():
            self.inline_code.append(data)


# ---- page and files -------------------------------------------------------------------------------


async def test_page_and_files_are_served_with_a_policy_that_allows_only_this_origin(tmp_path):
    async with running(make_app(tmp_path)) as client:
        for path in (*PAGES, *FILES):
            response = await client.get(path)
            assert response.status_code == 200, path
            policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
            assert policy["default-src"] == "'none'"
            assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
            assert policy["frame-ancestors"] == "'none'"
            assert "unsafe" not in response.headers["content-security-policy"]
            assert response.headers["x-content-type-options"] == "nosniff"
        types = {path: (await client.get(path)).headers["content-type"] for path in (*PAGES, *FILES)}
        assert types["/"].startswith("text/html") and types["/console"].startswith("text/html")
        assert types["/console/static/console.js"].startswith("text/javascript")
        assert types["/console/static/console.css"].startswith("text/css")
        assert (await client.get("/")).text == (await client.get("/console")).text


async def test_the_page_loads_nothing_from_elsewhere_and_has_no_inline_code(tmp_path):
    async with running(make_app(tmp_path)) as client:
        markup = _Markup()
        markup.feed((await client.get("/")).text)
        assert markup.inline_code == []
        urls = [value for _, attrs in markup.tags for key, value in attrs.items() if key in ("src", "href")]
        assert "console/static/console.js" in urls and "console/static/console.css" in urls
        for url in urls:
            assert not re.match(r"^([a-z]+:|//)", url), f"{url} leaves this origin"
        for tag, attrs in markup.tags:
            assert "style" not in attrs and not any(key.startswith("on") for key in attrs), tag
        script = (await client.get("/console/static/console.js")).text
        # Data reaches the page as text only: no HTML parsing of anything, no code from strings.
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in script
        assert re.findall(r"fetch\(([^,)]+)", script) == ["path"], "one fetch, to relative API paths"


async def test_unknown_console_files_are_404_and_nothing_outside_the_folder_is_served(tmp_path):
    async with running(make_app(tmp_path)) as client:
        for path in ("/console/static/missing.js", "/console/static/..%2Fapp.py", "/console/static/%2e%2e"):
            assert_envelope(await client.get(path), 404, "not_found")
        assert (await client.get("/console/static/../app.py")).status_code == 404


async def test_page_and_files_need_no_key_but_the_stats_do(tmp_path):
    async with running(make_app(tmp_path, api_key="s3cret")) as client:
        for path in (*PAGES, *FILES):
            assert (await client.get(path)).status_code == 200, path
        assert_envelope(await client.get("/console/stats"), 401, "unauthorized")
        assert_envelope(await client.get("/console/stats", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        assert (await client.get("/console/stats", headers={"X-API-Key": "s3cret"})).status_code == 200


async def test_the_setting_turns_the_console_off_and_nothing_else(tmp_path):
    async with running(make_app(tmp_path, console=False)) as client:
        for path in (*PAGES, *FILES, "/console/stats"):
            assert_envelope(await client.get(path), 404, "not_found")
        assert (await client.post("/classify", json={"inputs": "good", "adapter": "sst2"})).status_code == 200
        assert "/console/stats" not in (await client.get("/openapi.json")).json()["paths"]


# ---- live stats -----------------------------------------------------------------------------------


def test_histogram_quantile_interpolates_inside_the_bucket_like_prometheus():
    buckets = {0.01: 0.0, 0.025: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01 + 0.015 * 0.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.015 * 0.99)
    assert histogram_quantile(0.5, {0.1: 2.0, 1.0: 2.0, float("inf"): 10.0}) == 1.0  # in +Inf: the highest bound
    assert histogram_quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_live_stats_rates_and_percentiles_cover_a_recent_window(tmp_path):
    service = Service(Settings(model_dir=tmp_path), fake_components([]))
    clock = Clock()
    stats = LiveStats(service, window_s=10.0, clock=clock)
    metrics = service.metrics

    for _ in range(10):
        metrics.observe_request("sst2", 200, 0.02)
    clock.now += 5
    first = stats.summary()
    assert (first.requests_total, first.window_s, first.requests_per_s) == (10, 5.0, 2.0)
    assert first.latency_p50_ms == pytest.approx(17.5)  # bucket (10 ms, 25 ms], halfway

    for _ in range(6):
        metrics.observe_request("sst2", 200, 0.3)
    metrics.observe_request("sst2", 404, 0.001)
    clock.now += 1
    second = stats.summary()  # against the copy taken a second ago: only the new requests
    assert (second.requests_total, second.errors_total, second.window_s) == (17, 1, 1.0)
    assert second.requests_per_s == 7.0
    assert 250 < second.latency_p50_ms <= 500 and second.latency_p99_ms <= 500

    clock.now += 14
    quiet = stats.summary()  # against the newest copy at least 10 s old: no traffic since
    assert (quiet.window_s, quiet.requests_per_s, quiet.latency_p50_ms) == (14.0, 0.0, None)
    assert quiet.requests_total == 17


async def test_stats_route_reports_per_adapter_routing_from_the_metrics(tmp_path):
    texts = ["good", "a good film", "bad one two three"]
    async with running(make_app(tmp_path, shadow_fraction=0.0)) as client:
        empty = (await client.get("/console/stats")).json()
        assert (empty["requests_total"], empty["adapters"]) == (0, {})
        answer = (await client.post("/classify", json={"inputs": texts, "adapter": "sst2"})).json()
        await client.post("/classify", json={"inputs": "x", "adapter": "nope"})
        stats = (await client.get("/console/stats")).json()
    assert (stats["requests_total"], stats["errors_total"]) == (2, 1)
    assert (stats["adapters_loaded"], stats["adapters_available"]) == (2, 2)
    assert (stats["shadow_fraction"], stats["drift_window"]) == (0.0, 1000)
    sst2 = stats["adapters"]["sst2"]
    rows = answer["results"]
    assert sst2["inputs"] == len(texts) and set(stats["adapters"]) == {"sst2"}
    assert sst2["mean_active_adapters"] == pytest.approx(sum(r["active_adapters"] for r in rows) / len(rows))
    assert sst2["mean_active_rank"] == pytest.approx(sum(r["active_rank"] for r in rows) / len(rows))
    assert sst2["adapter_flops_saved"] == pytest.approx(sum(r["flops"]["adapter_saved"] for r in rows))
    assert (sst2["shadow_checks"], sst2["shadow_agreement"], sst2["routing_drift"]) == (0, None, None)


# ---- what the grid is drawn from: site lists and per-site ranks -----------------------------------


@pytest.fixture
def rank_routed_dir(tmp_path, tiny_base_dir):
    """A RAD-LoRA adapter whose last sites were pruned, beside a CoGaLoRA one, on one tiny encoder."""
    root = tmp_path / "models"
    synthetic_checkpoint(root / "rad", str(tiny_base_dir), ["neg", "pos"], method="radlora", seed=3, keep_sites=9)
    synthetic_checkpoint(root / "two", str(tiny_base_dir), ["neg", "pos"], seed=0)
    return root


async def test_adapters_list_their_sites_and_results_the_rank_of_each_active_site(rank_routed_dir):
    settings = Settings(model_dir=rank_routed_dir, dtype="float32")  # the reference below runs in float32
    repository, engine = build_engine(settings, ServiceMetrics())
    components = on_engine(repository, engine)
    texts = [tiny_text(3 + seed % 9, seed=seed) for seed in range(12)]
    app = create_app(settings, components=components)
    async with running(app) as client:
        catalogue = {entry["name"]: entry for entry in (await client.get("/adapters")).json()["adapters"]}
        answer = await client.post("/classify", json={"inputs": texts, "adapter": "rad"})
        plain = await client.post("/classify", json={"inputs": texts[:3], "adapter": "two"})
    site_names = repository.encoders()[0].site_names
    rad, two = catalogue["rad"], catalogue["two"]
    assert rad["sites"] == two["sites"] == site_names  # the encoder's own site list, in its order
    assert rad["total_adapters"] == len(site_names) == 12
    assert rad["dropped_sites"] == site_names[9:] and two["dropped_sites"] == []
    assert (rad["rank"], rad["rank_set"], two["rank_set"]) == (8, [0, 2, 4, 8], None)

    # The ranks the training-side model picks for each row are the oracle.
    loaded = load_model(rank_routed_dir / "rad")
    with torch.inference_mode():
        reference = loaded.model(**loaded.tokenizer(texts, padding=True, return_tensors="pt"))
    results = answer.json()["results"]
    for row, result in enumerate(results):
        ranks = reference.ranks[row].tolist()
        expected = [(name, rank) for name, rank in zip(site_names, ranks, strict=True) if rank > 0]
        assert list(zip(result["active_modules"], result["active_ranks"], strict=True)) == expected
        assert sum(result["active_ranks"]) == result["active_rank"]
        assert not set(result["active_modules"]) & set(rad["dropped_sites"])
    assert {rank for result in results for rank in result["active_ranks"]} >= {2, 8}, "ranks really vary"
    for result in plain.json()["results"]:
        assert result["active_ranks"] == [8] * result["active_adapters"]
