"""A real headless browser for the tests (no tests here): Debian's Chromium driven by Selenium.

``chromium()`` starts the browser with the flags it needs as root on a closed network;
:class:`ConsolePage` drives the web console the way a user does (typing, choosing, dragging the
slider with the keyboard) and reads back what the page shows. Run as a script it takes the
README's screenshot of the console against a running service:

    .venv/bin/python tests/browser.py --url http://127.0.0.1:8000/ --output docs/console.png
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Without the background-networking flags Chromium keeps opening connections that this closed
#: network refuses, and stalls; as root it needs --no-sandbox.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
WAIT_S = 30.0


def unavailable() -> str | None:
    """Why no browser test can run here (None: it can)."""
    for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not binary.is_file():
            return f"{binary} is missing (Debian package {package}; bash scripts/setup.sh --dev installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@contextmanager
def chromium(width: int = 1360, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium (a Selenium WebDriver) with a fresh profile, quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="cogalora-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        set_viewport(driver, width, height)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def set_viewport(driver: Any, width: int, height: int, scale: float = 1.0) -> None:
    """The page's exact viewport in CSS pixels (a window size includes the browser's own frame)."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


# What the newest run shows, read from the page's DOM (the text the user sees, not the page's data).
_READ_NEWEST_RUN = """
const run = document.querySelector('#runs .run');
if (!run) return null;
return {
  seq: Number(run.dataset.seq),
  adapter: run.dataset.adapter,
  head: run.querySelector('.run-head').textContent,
  rows: [...run.querySelectorAll('.row')].map((row) => ({
    text: row.querySelector('.row-text').textContent,
    label: row.querySelector('.row-label').textContent,
    scores: [...row.querySelectorAll('.scores .name')].map((name) => name.textContent),
    sites: [...row.querySelectorAll('td[data-site]')].map((cell) => cell.dataset.site),
    lit: [...row.querySelectorAll('td.on')].map((cell) => cell.dataset.site),
    ranks: [...row.querySelectorAll('td.on')].map((cell) => cell.textContent),
    dropped: [...row.querySelectorAll('td.dropped')].map((cell) => cell.dataset.site),
    tokens: row.querySelector('.row-tokens').textContent,
    truncated: row.querySelector('.facts .tag.warn')?.textContent === 'truncated',
    images: row.querySelectorAll('img').length,
  })),
};
"""


class ConsolePage:
    """The console at ``url`` in ``driver``."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url.rstrip("/") + "/"

    # ---- waiting ------------------------------------------------------------------------------

    def until(self, condition, what: str, timeout: float = WAIT_S) -> Any:
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
            lambda _: condition(), message=f"{what} (within {timeout:.0f} s)"
        )

    def find(self, element_id: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def visible(self, element_id: str) -> bool:
        return self.find(element_id).is_displayed()

    # ---- opening and the API key ---------------------------------------------------------------

    def open(self) -> ConsolePage:
        """Load the page in a fresh tab state (no API key remembered)."""
        self.driver.get(self.url)
        self.driver.execute_script("sessionStorage.clear()")
        self.driver.get(self.url)
        return self

    def wait_ready(self) -> ConsolePage:
        self.until(
            lambda: (
                self.visible("app")
                and self.driver.execute_script("return document.querySelectorAll('#adapter option').length")
            ),
            "the console shows its adapters",
        )
        return self

    def wait_for_key_prompt(self) -> None:
        self.until(lambda: self.visible("key-panel"), "the console asks for the API key")

    def enter_key(self, key: str) -> None:
        field = self.find("key-input")
        field.clear()
        field.send_keys(key)
        self.find("key-form").submit()

    def key_error(self) -> str:
        return self.find("key-error").text if self.visible("key-error") else ""

    # ---- trying adapters -----------------------------------------------------------------------

    def choose(self, adapter: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.find("adapter")).select_by_visible_text(adapter)

    def newest_run(self) -> dict | None:
        return self.driver.execute_script(_READ_NEWEST_RUN)

    def _after(self, action, what: str) -> dict:
        before = (self.newest_run() or {"seq": 0})["seq"]
        action()
        return self.until(lambda: (run := self.newest_run()) and run["seq"] > before and run, what)

    def classify(self, adapter: str, texts: list[str]) -> dict:
        """Choose ``adapter``, type ``texts`` one per line, press Classify; the run the page drew."""
        self.choose(adapter)
        box = self.find("inputs")
        box.clear()
        box.send_keys("\n".join(texts))
        return self._after(lambda: self.find("classify").click(), f"the page shows {adapter}'s answer")

    def move_tau_to_zero(self) -> dict:
        """Drag τ to 0 with the keyboard (Home on the slider); the run the page redrew."""
        from selenium.webdriver.common.keys import Keys

        return self._after(lambda: self.find("tau").send_keys(Keys.HOME), "the page redraws the run at tau 0")

    def error(self) -> str:
        return self.find("error").text if self.visible("error") else ""

    # ---- live panel and screenshots ------------------------------------------------------------

    def live_requests(self) -> int | None:
        text = self.find("live-requests").text.strip()
        return int(text) if text.isdigit() else None

    def screenshot(self, path: Path, width: int, scale: float = 1.0) -> None:
        """The whole page, ``width`` CSS pixels wide."""
        height = self.driver.execute_script("return document.body.scrollHeight")
        set_viewport(self.driver, width, height, scale)
        self.driver.save_screenshot(str(path))

    def console_problems(self) -> list[str]:
        """Browser console messages at warning level or worse (CSP refusals, failed loads, script errors)."""
        return [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] in ("WARNING", "SEVERE")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot of the console with two committed adapters' answers.")
    parser.add_argument("--url", default="http://127.0.0.1:8000/", help="The running service (python -m service).")
    parser.add_argument("--output", type=Path, default=Path("docs/console.png"), help="PNG to write.")
    parser.add_argument("--width", type=int, default=1360, help="Page width in CSS pixels.")
    parser.add_argument("--scale", type=float, default=1.0, help="Device pixels per CSS pixel.")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        parser.error(reason)
    with chromium(args.width) as driver:
        page = ConsolePage(driver, args.url).open().wait_ready()
        page.classify("sst2", ["a gripping, beautifully acted film"])
        page.classify("sst2-radlora", ["the plot is thin, but the performances are wonderful"])
        shown = "return document.querySelectorAll('#live-adapters tbody tr').length"
        page.until(lambda: driver.execute_script(shown) >= 2, "the live panel shows both adapters' traffic")
        page.screenshot(args.output, args.width, args.scale)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
