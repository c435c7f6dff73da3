"""The web console in a real headless Chromium (tests/browser.py) against real ``python -m service``
processes: what the page shows equals what the API answers, τ redraws the grid, the live panel
follows traffic, markup stays text, and the API key is asked for.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from browser import ConsolePage, chromium, unavailable
from processes import API_KEY

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(unavailable() is not None, reason=f"no browser: {unavailable()}"),
]

SENTENCES = ["an absolutely wonderful film with a moving story", "the plot was dull and the acting was worse"]
MARKUP = "<img src=x onerror=alert(1)>"
MARKUP_LABELS = ["<b>bold</b>", "<script>alert(2)</script>"]


@pytest.fixture(scope="module")
def service(minilm_model_dir, start_service, tmp_path_factory):
    """An open service (no API key) on two of the shared test adapters, ``markup``, whose label names
    are markup, and ``broken``, which cannot be served; every routed row gets a shadow check."""
    root = tmp_path_factory.mktemp("console-models")
    for name in ("sst2", "plain"):
        shutil.copytree(minilm_model_dir / name, root / name)
    shutil.copytree(minilm_model_dir / "sst2", root / "markup")
    config = root / "markup" / "cogalora.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "labels": MARKUP_LABELS}), encoding="utf-8")
    (root / "broken").mkdir()
    (root / "broken" / "cogalora.json").write_text('{"format_version": 1}', encoding="utf-8")
    return start_service(root, COGALORA_SHADOW_FRACTION="1")


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def classify(url: str, texts: list[str], adapter: str, key: str | None = None, **extra) -> list[dict]:
    headers = {"X-API-Key": key} if key else {}
    body = {"inputs": texts, "adapter": adapter, **extra}
    response = httpx.post(f"{url}/classify", json=body, headers=headers, timeout=60, trust_env=False)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def no_alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert  # noqa: B018 (the property raises when no dialog is open)
    except NoAlertPresentException:
        return True
    return False


def test_two_sentences_show_the_labels_and_sites_that_classify_answers(service, browser):
    page = ConsolePage(browser, service.url).open().wait_ready()
    assert not page.visible("key-panel")
    run = page.classify("sst2", SENTENCES)
    expected = classify(service.url, SENTENCES, "sst2")
    assert [row["text"] for row in run["rows"]] == SENTENCES
    for row, result in zip(run["rows"], expected, strict=True):
        assert row["label"] == result["label"]
        assert row["lit"] == result["active_modules"]
        assert row["scores"] == [entry["label"] for entry in result["scores"]]
        assert len(row["sites"]) == result["total_adapters"] == 36
        assert row["tokens"] == str(result["tokens"])
    assert any(0 < len(row["lit"]) < 36 for row in run["rows"]), "the check needs some gates off"
    assert page.console_problems() == []  # no refused script, style or request, no script error


def test_the_catalogue_shows_every_adapter_and_why_others_cannot_be_served(service, browser):
    ConsolePage(browser, service.url).open().wait_ready()
    catalogue = httpx.get(f"{service.url}/adapters", timeout=10, trust_env=False).json()
    read = """return [...document.querySelectorAll('#adapter-list .adapter')].map((entry) => [
        entry.dataset.adapter, entry.querySelector('.tag.method').textContent, entry.textContent])"""
    shown = browser.execute_script(read)
    assert [name for name, _, _ in shown] == [entry["name"] for entry in catalogue["adapters"]]
    for (_, method, text), entry in zip(shown, catalogue["adapters"], strict=True):
        assert method == entry["method"]
        assert f"τ {entry['tau']:.2f}" in text and "loaded" in text
    reasons = browser.execute_script("return document.querySelector('#unavailable').textContent")
    assert list(catalogue["unavailable"]) == ["broken"]
    assert f"broken: {catalogue['unavailable']['broken']}" in reasons


def test_tau_at_zero_lights_every_site(service, browser):
    page = ConsolePage(browser, service.url).open().wait_ready()
    page.classify("sst2", SENTENCES)
    run = page.move_tau_to_zero()
    assert "τ 0.00" in run["head"]
    dense = classify(service.url, SENTENCES, "sst2", threshold=0.0)
    for row, result in zip(run["rows"], dense, strict=True):
        assert row["lit"] == row["sites"] == result["active_modules"]
        assert len(row["lit"]) == 36
    assert page.console_problems() == []


def test_a_long_input_shows_its_truncation(service, browser):
    long_text = " ".join(["a remarkably long and winding review of the film"] * 30)
    page = ConsolePage(browser, service.url).open().wait_ready()
    row = page.classify("plain", [long_text])["rows"][0]
    result = classify(service.url, [long_text], "plain")[0]
    assert result["truncated"] and result["input_tokens"] > result["tokens"]
    assert row["tokens"] == f"{result['tokens']} of {result['input_tokens']}"
    assert row["truncated"]


def test_the_live_panel_follows_traffic(service, browser):
    page = ConsolePage(browser, service.url).open().wait_ready()
    before = page.until(lambda: page.live_requests(), "the live panel shows a request count")
    for text in SENTENCES + SENTENCES:
        classify(service.url, [text], "plain")
    page.until(lambda: page.live_requests() >= before + 4, "the live panel counts 4 more requests")
    shown = "return [...document.querySelectorAll('#live-adapters tbody tr')].map((tr) => tr.dataset.adapter)"
    assert "plain" in browser.execute_script(shown)
    headers = browser.execute_script(
        "return [...document.querySelectorAll('#live-head th')].map((th) => th.textContent)"
    )
    assert "shadow" in headers  # shadow checks are on for this service


def test_markup_from_users_and_checkpoints_shows_as_text_and_runs_nothing(service, browser):
    page = ConsolePage(browser, service.url).open().wait_ready()
    catalogue = browser.execute_script("return document.querySelector('[data-adapter=\"markup\"]').textContent")
    assert ", ".join(MARKUP_LABELS) in catalogue
    run = page.classify("markup", [MARKUP, "a good film"])
    assert run["rows"][0]["text"] == MARKUP
    assert all(row["images"] == 0 for row in run["rows"])
    assert sorted(run["rows"][0]["scores"]) == sorted(MARKUP_LABELS)
    elements = "return document.querySelectorAll('.row-text *, .scores .name *, script:not([src])').length"
    assert browser.execute_script(elements) == 0
    assert no_alert(browser)
    assert page.console_problems() == []  # an inline handler would have been refused, and logged


def test_with_an_api_key_the_page_asks_for_it_and_shows_a_refusal(keyed_service, browser):
    page = ConsolePage(browser, keyed_service.url).open()
    page.wait_for_key_prompt()
    assert not page.visible("app")
    page.enter_key("not-the-key")
    page.until(lambda: "invalid API key" in page.key_error(), "the page shows the service's refusal")
    assert page.visible("key-panel") and not page.visible("app")
    page.enter_key(API_KEY)
    page.wait_ready()
    run = page.classify("sst2", SENTENCES[:1])
    assert run["rows"][0]["label"] == classify(keyed_service.url, SENTENCES[:1], "sst2", key=API_KEY)[0]["label"]
    page.until(lambda: page.live_requests() is not None, "the live panel reads the stats with the key")
