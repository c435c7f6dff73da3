"""Who may do what, against real ``python -m service`` processes on the packaged MiniLM.

One process with no keys (the default configuration), the shared keyed service (an inference key
only), and one process with an admin key and a key file shared by the rest of the module: scopes
through every protocol, rate limits with their counters, fairness under a flood, key file reloads.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from processes import ADMIN_KEY, API_KEY, REPO, ServiceProcess, metric_sum, wait_until

from benchmarks.loadtest import LoadTestConfig, percentile, run_load
from service.keys import digest

pytestmark = pytest.mark.integration

#: key id -> key; their entries are written by ``key_file_text``.
KEYS = {
    "alice": "alice-key-0123456789",
    "bob": "bob-key-0123456789",
    "limited": "limited-key-0123456789",
    "rows": "rows-key-0123456789",
    "flood": "flood-key-0123456789",
    "steady": "steady-key-0123456789",
    "dave": "dave-key-0123456789",
    "carol": "carol-key-0123456789",
    "erin": "erin-key-0123456789",
}
ENTRIES = {
    "alice": 'adapters = ["sst2"]',
    "bob": 'adapters = ["agnews", "pl*"]',
    # 0.5 requests/s, two at once: the third request of a quick series is refused for ~2 s.
    "limited": 'adapters = ["sst2"]\nrequests_per_second = 0.5\nburst_seconds = 4',
    # 4 inputs/s, four at once.
    "rows": 'adapters = ["sst2"]\nrows_per_second = 4',
    "flood": 'adapters = ["sst2"]\nrequests_per_second = 4',
    "steady": 'adapters = ["sst2"]',
    "dave": 'adapters = ["*"]',
    "carol": 'adapters = ["*"]',
    "erin": 'adapters = ["*"]',
}


def key_file_text(*key_ids: str) -> str:
    return "".join(
        f'[keys.{key_id}]\nsha256 = "{digest(KEYS[key_id]).hex()}"\n{ENTRIES[key_id]}\n\n' for key_id in key_ids
    )


FIRST_KEYS = ("alice", "bob", "limited", "rows", "flood", "steady", "dave")


def auth(key_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key_id]}"}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(key_file_text(*FIRST_KEYS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def keyed(minilm_model_dir, start_service, key_file):
    """The service with an admin key and the key file (and only those: no inference key)."""
    return start_service(
        minilm_model_dir,
        COGALORA_ADMIN_KEY=ADMIN_KEY,
        COGALORA_KEY_FILE=str(key_file),
        COGALORA_LOG_FORMAT="json",  # at the tests' WARNING level: audit lines are kept at any level
    )


def post(client: httpx.Client, path: str, body: dict, key_id: str | None = None) -> httpx.Response:
    return client.post(path, json=body, headers=auth(key_id) if key_id else {})


# ---- admin closed by default ----------------------------------------------------------------------


def test_default_configuration_closes_admin_routes_and_serves(minilm_model_dir, start_service):
    server = start_service(minilm_model_dir)
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
        for response in (client.delete("/adapters/sst2"), client.post("/adapters/sst2")):
            assert response.status_code == 403, response.text
            assert response.json()["error_type"] == "forbidden"
            assert "COGALORA_ADMIN_KEY" in response.json()["error"]
        # An admin-looking key changes nothing where no admin key is configured.
        assert client.delete("/adapters/sst2", headers={"X-API-Key": "guess"}).status_code == 403
        answer = client.post("/classify", json={"inputs": "a fine film", "adapter": "sst2"})
        assert answer.status_code == 200, answer.text
        assert {a["name"] for a in client.get("/adapters").json()["adapters"]} == {"sst2", "agnews", "plain"}


def test_the_inference_key_never_opens_admin_routes(keyed_service):
    with httpx.Client(base_url=keyed_service.url, timeout=60, trust_env=False) as client:
        assert client.delete("/adapters/sst2").status_code == 401
        refused = client.delete("/adapters/sst2", headers={"Authorization": f"Bearer {API_KEY}"})
        assert refused.status_code == 403 and refused.json()["error_type"] == "forbidden"
        still = client.post("/classify", json={"inputs": "x", "adapter": "sst2"}, headers={"X-API-Key": API_KEY})
        assert still.status_code == 200


def test_admin_key_loads_and_unloads_and_every_action_is_audited(keyed):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=keyed.url, timeout=60, trust_env=False) as client:
        assert client.delete("/adapters/plain").status_code == 401
        assert client.delete("/adapters/plain", headers=auth("bob")).status_code == 403  # not an admin key
        assert client.delete("/adapters/plain", headers=admin).json() == {"name": "plain", "status": "unloaded"}
        gone = post(client, "/classify", {"inputs": "x", "adapter": "plain"}, "bob")
        assert gone.status_code == 404
        loaded = client.post("/adapters/plain", headers=admin)
        assert loaded.status_code == 201 and loaded.json()["name"] == "plain"
        assert post(client, "/classify", {"inputs": "x", "adapter": "plain"}, "bob").status_code == 200
    lines = wait_until(lambda: [line for line in keyed.log_text().splitlines() if '"audit": true' in line], 10)
    records = [json.loads(line) for line in lines]
    # The request without a key never reached a route: refused at the edge (401, in the access log).
    assert [(r["who"], r["action"], r["target"], r["outcome"], r["status"]) for r in records] == [
        ("bob", "DELETE /adapters/{name}", "name=plain", "refused", 403),
        ("admin_key", "DELETE /adapters/{name}", "name=plain", "allowed", 200),
        ("admin_key", "POST /adapters/{name}", "name=plain", "allowed", 201),
    ]
    assert all(r["logger"] == "cogalora.audit" and r["ts"] for r in records)
    log = keyed.log_text()
    assert all(key not in log for key in (ADMIN_KEY, *KEYS.values()))


# ---- scopes --------------------------------------------------------------------------------------


ONE_TEXT = {"inputs": "a fine film"}
OIP_BODY = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a fine film"]}]}


def protocol_calls(client: httpx.Client, key_id: str) -> dict[str, Callable[[str], httpx.Response]]:
    """Every route that names an adapter, as ``call(adapter)`` with ``key_id``'s key."""
    headers = auth(key_id)
    return {
        "classify": lambda adapter: client.post("/classify", json={**ONE_TEXT, "adapter": adapter}, headers=headers),
        "tei": lambda adapter: client.post(f"/models/{adapter}", json=ONE_TEXT, headers=headers),
        "tei predict": lambda adapter: client.post(f"/models/{adapter}/predict", json=ONE_TEXT, headers=headers),
        "oip infer": lambda adapter: client.post(f"/v2/models/{adapter}/infer", json=OIP_BODY, headers=headers),
        "oip metadata": lambda adapter: client.get(f"/v2/models/{adapter}", headers=headers),
        "oip ready": lambda adapter: client.get(f"/v2/models/{adapter}/ready", headers=headers),
    }


def assert_scoped(url: str) -> None:
    """alice (sst2) and bob (agnews, pl*) each list and use only their adapters; the other's is a missing one."""
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        listed = {
            key_id: {a["name"] for a in client.get("/adapters", headers=auth(key_id)).json()["adapters"]}
            for key_id in ("alice", "bob")
        }
        assert listed == {"alice": {"sst2"}, "bob": {"agnews", "plain"}}
        for key_id, mine, theirs in (("alice", "sst2", "agnews"), ("bob", "agnews", "sst2")):
            for protocol, call in protocol_calls(client, key_id).items():
                assert call(mine).status_code == 200, (key_id, protocol)
                other, missing = call(theirs), call("nothere")
                assert other.status_code == missing.status_code == 404, (key_id, protocol, other.text)
                # Indistinguishable from a missing adapter: the same body once the name is swapped.
                assert other.json() == {**missing.json(), "error": missing.json()["error"].replace("nothere", theirs)}
        # Without "adapter", a key with one adapter in scope gets that one; with two, it must name one.
        assert client.post("/classify", json={"inputs": "x"}, headers=auth("alice")).json()["adapter"] == "sst2"
        required = client.post("/classify", json={"inputs": "x"}, headers=auth("bob"))
        assert required.status_code == 422 and "2 adapters" in required.json()["error"]


def test_each_key_sees_and_uses_only_its_adapters_through_every_protocol(keyed):
    assert_scoped(keyed.url)


# ---- rate limits ---------------------------------------------------------------------------------


def test_rate_limits_answer_429_with_retry_after_and_count_exactly(keyed):
    body = {"inputs": ["a fine film", "dull"], "adapter": "sst2"}
    with httpx.Client(base_url=keyed.url, timeout=60, trust_env=False) as client:
        before = client.get("/metrics").text
        statuses, retry_after = [], []
        for _ in range(5):  # well within one second: the bucket refills 0.5 requests meanwhile
            response = post(client, "/classify", body, "limited")
            statuses.append(response.status_code)
            retry_after.append(response.headers.get("retry-after"))
        assert statuses == [200, 200, 429, 429, 429]
        refused = post(client, "/classify", body, "limited")
        assert refused.status_code == 429 and refused.json()["error_type"] == "rate_limited"
        wait = int(refused.headers["retry-after"])
        assert 1 <= wait <= 2  # one token at 0.5/s: at most 2 s away
        after = client.get("/metrics").text

        def moved(name: str, **labels: str) -> float:
            return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

        assert moved("cogalora_key_requests_total", key_id="limited", code="200") == 2
        assert moved("cogalora_key_requests_total", key_id="limited", code="429") == 4
        assert moved("cogalora_key_rate_limited_total", key_id="limited", limit="requests") == 4
        assert moved("cogalora_key_inputs_total", key_id="limited") == 4
        assert moved("cogalora_requests_total", adapter="unknown", code="429") == 4  # refused before the body is read
        assert moved("cogalora_key_requests_total", key_id="alice") == 0, "other keys are not charged"
        # After Retry-After the bucket holds a token again: the configured rate, not a lock-out.
        time.sleep(wait)
        assert post(client, "/classify", body, "limited").status_code == 200

        three = {"inputs": ["a", "b", "c"], "adapter": "sst2"}
        assert post(client, "/classify", three, "rows").status_code == 200  # 4 row tokens, 1 left
        over = post(client, "/classify", three, "rows")
        assert over.status_code == 429 and over.headers["retry-after"] == "1"  # 2 more tokens at 4/s
        page = client.get("/metrics").text
        assert metric_sum(page, "cogalora_key_rate_limited_total", key_id="rows", limit="rows") == 1
        assert metric_sum(page, "cogalora_key_inputs_total", key_id="rows") == 3


# ---- fairness ------------------------------------------------------------------------------------

STEADY_RATE = 20.0
"""Steady key: requests per second, one input each."""
FLOOD_RATE = 40.0
"""Flooding key: requests per second of two inputs each, 10x its limit of 4 per second."""
WINDOW_S = 3.0
PAIRS = 4
ATTEMPTS = 2
"""The latency comparison is measured again once when the first measurement fails it (a burst of load from
elsewhere on a shared machine); every other check holds on every measurement."""


def flood_requests(service, page: str | None = None, code: str | None = None) -> float:
    """Requests of the flooding key the service counted (on ``page``, else now), with status ``code`` or any."""
    labels = {"key_id": "flood"} | ({"code": code} if code else {})
    return metric_sum(page if page is not None else service.metrics_text(), "cogalora_key_requests_total", **labels)


@contextmanager
def flooding(service):
    """The flooding key's open-loop load from a process of its own (so its client work is not the test's),
    from the moment its requests reach the service until the block ends."""
    command = [
        sys.executable, "-m", "benchmarks.loadtest", "--url", service.url, "--rate", str(FLOOD_RATE),
        "--arrival", "constant", "--duration", str(WINDOW_S + 60), "--batch", "2", "--adapter-mix", "sst2=1",
        "--api-key", KEYS["flood"], "--no-progress",
    ]  # fmt: skip
    reached = flood_requests(service) + 20
    flood = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: flood_requests(service) >= reached, 30, what="the flood reaching the service")
        yield
    finally:
        flood.terminate()
        flood.wait(30)


def steady_window(url: str) -> list[tuple[float, int | None]]:
    """The steady key's open-loop traffic for one window: (latency, status) per request."""
    config = LoadTestConfig(
        url=url,
        rate=STEADY_RATE,
        arrival="constant",
        duration=WINDOW_S,
        adapter_mix=[("sst2", 1.0)],
        api_key=KEYS["steady"],
        timeout=30.0,
        progress=False,
    )
    return [(record.latency, record.status) for record in asyncio.run(run_load(config))["_records"]]


@dataclass
class FloodMeasurement:
    """Windows without and with the flood, alternating (so load from elsewhere falls on both alike)."""

    unloaded: list[float] = field(default_factory=list)
    loaded: list[float] = field(default_factory=list)
    statuses: Counter[int | None] = field(default_factory=Counter)
    flood_admitted: float = 0.0
    flood_refused: float = 0.0

    def p(self, condition: str, q: float) -> float:
        return percentile(getattr(self, condition), q) * 1000

    @property
    def p99_ratio(self) -> float:
        return self.p("loaded", 99) / self.p("unloaded", 99)

    def summary(self) -> str:
        return (
            f"steady key without the flood: p50 {self.p('unloaded', 50):.1f} ms, p99 {self.p('unloaded', 99):.1f} ms "
            f"({len(self.unloaded)} requests); with it: p50 {self.p('loaded', 50):.1f} ms, p99 "
            f"{self.p('loaded', 99):.1f} ms ({len(self.loaded)}); p99 ratio {self.p99_ratio:.2f}. Flood: "
            f"{self.flood_admitted:.0f} admitted, {self.flood_refused:.0f} refused with 429"
        )


def measure_flood(service) -> FloodMeasurement:
    measured = FloodMeasurement()
    before = service.metrics_text()
    measured.statuses.update(status for _, status in steady_window(service.url))  # a warm-up: no latencies
    for _ in range(PAIRS):
        for condition in ("unloaded", "loaded"):
            with flooding(service) if condition == "loaded" else nullcontext():
                window = steady_window(service.url)
            getattr(measured, condition).extend(latency for latency, _ in window)
            measured.statuses.update(status for _, status in window)
    after = service.metrics_text()
    measured.flood_admitted = flood_requests(service, after, "200") - flood_requests(service, before, "200")
    measured.flood_refused = flood_requests(service, after, "429") - flood_requests(service, before, "429")
    return measured


def test_a_flooding_key_does_not_slow_a_steady_key(keyed):
    """Key "flood" sends 40 requests/s of two inputs, 10x its rate of 4/s; key "steady" sends 20 requests/s.

    The steady key gets no 429, 503 or timeout, and its p99 latency under the flood stays within 2x of
    its own p99 without it (four alternating windows of each).
    """
    attempts: list[FloodMeasurement] = []
    while len(attempts) < ATTEMPTS:
        measured = measure_flood(keyed)
        attempts.append(measured)
        print("\n" + measured.summary())
        assert set(measured.statuses) == {200}, measured.statuses  # no 429, 503, 504 or lost request
        assert measured.flood_refused > 4 * measured.flood_admitted > 0, "about 10x its rate, mostly refused"
        if measured.p99_ratio <= 2:
            break
    assert attempts[-1].p99_ratio <= 2, [attempt.summary() for attempt in attempts]


# ---- key file reloads ----------------------------------------------------------------------------


def test_a_changed_key_file_takes_effect_without_restart(keyed, key_file):
    body = {"inputs": "a fine film", "adapter": "sst2"}
    with httpx.Client(base_url=keyed.url, timeout=60, trust_env=False) as client:
        assert post(client, "/classify", body, "dave").status_code == 200
        assert post(client, "/classify", body, "carol").status_code == 401
        replacement = key_file.with_suffix(".new")
        replacement.write_text(key_file_text(*(k for k in FIRST_KEYS if k != "dave"), "carol"), encoding="utf-8")
        os.replace(replacement, key_file)  # as editors and config managers write: a new file, renamed
        wait_until(lambda: post(client, "/classify", body, "carol").status_code == 200, 15, what="carol's key valid")
        assert post(client, "/classify", body, "dave").status_code == 401
        assert post(client, "/classify", body, "alice").status_code == 200

        # SIGHUP re-reads the file even when nothing about it looks changed: same inode, size and time.
        status = key_file.stat()
        text = key_file.read_text(encoding="utf-8")
        swapped = text.replace(digest(KEYS["carol"]).hex(), digest(KEYS["erin"]).hex())
        with key_file.open("r+", encoding="utf-8") as handle:
            handle.write(swapped)
        os.utime(key_file, ns=(status.st_atime_ns, status.st_mtime_ns))
        reloads = metric_sum(keyed.metrics_text(), "cogalora_key_file_reloads_total", outcome="ok")
        os.kill(keyed.proc.pid, signal.SIGHUP)
        wait_until(lambda: post(client, "/classify", body, "erin").status_code == 200, 15, what="erin's key valid")
        assert post(client, "/classify", body, "carol").status_code == 401
        assert metric_sum(keyed.metrics_text(), "cogalora_key_file_reloads_total", outcome="ok") == reloads + 1

        # A broken file is reported and changes nothing: the keys in force stay.
        key_file.write_text("[keys.x]\nsha256 = 'not hex'\n", encoding="utf-8")
        wait_until(
            lambda: metric_sum(keyed.metrics_text(), "cogalora_key_file_reloads_total", outcome="invalid") >= 1,
            15,
            what="the invalid reload counted",
        )
        assert post(client, "/classify", body, "erin").status_code == 200
        assert keyed.proc.poll() is None


def test_an_invalid_key_file_stops_the_start_with_a_clear_message(tmp_path):
    bad = tmp_path / "keys.toml"
    bad.write_text('[keys.alice]\nsha256 = "00"\nadapters = ["*"]\n', encoding="utf-8")
    env = {**os.environ, "COGALORA_KEY_FILE": str(bad)}
    result = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "keys.alice.sha256" in result.stderr and "Traceback" not in result.stderr


# ---- the same through Ray Serve ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_keyed(minilm_model_dir, tmp_path_factory):
    """``python -m service.ray_serve --replicas 1`` with a key file of alice and bob only."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]' (the dev extra)")
    directory = tmp_path_factory.mktemp("ray_keys")
    key_file = directory / "keys.toml"
    key_file.write_text(key_file_text("alice", "bob"), encoding="utf-8")
    process = ServiceProcess(
        minilm_model_dir,
        directory / "ray_serve.log",
        {"COGALORA_KEY_FILE": str(key_file), "COGALORA_PRELOAD_ADAPTERS": "0"},
        command=[sys.executable, "-m", "service.ray_serve", "--replicas", "1", "--host", "127.0.0.1"],
        name="ray_serve",
    )
    try:
        process.wait_ready(timeout=300)
        yield process
    finally:
        process.stop(timeout=90)


def test_scopes_hold_through_ray_serve(ray_keyed):
    assert_scoped(ray_keyed.url)
    with httpx.Client(base_url=ray_keyed.url, timeout=60, trust_env=False) as client:
        assert client.get("/replicas").status_code == 401
        # The one replica holds sst2 and agnews (each key used its own above); each key sees only its own.
        held = {}
        for key_id in ("alice", "bob"):
            (replica,) = client.get("/replicas", headers=auth(key_id)).json()["replicas"]
            held[key_id] = set(replica["loaded"])
        assert held == {"alice": {"sst2"}, "bob": {"agnews"}}
        refused = client.delete("/adapters/sst2", headers=auth("alice"))
        assert refused.status_code == 403 and refused.json()["error_type"] == "forbidden"
