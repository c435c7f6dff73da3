"""`docker compose up` for real: build the image, run the service with Prometheus, use it as a user would.

A real Docker engine (``dockerd`` is started when none runs, and then stopped again), local base
images made with debootstrap (no registry is reachable here; see tests/containers.py), the project
image built by compose from docker/Dockerfile, and ``docker-compose -f docker/compose.yaml up -d
cogalora prometheus`` on free host ports. Then: /ready, answers identical to the in-process service
on the committed models, a non-root server process, healthchecks, Prometheus scraping the service
by its compose name, the dashboard's queries after a short load, and a ``stop`` that drains.

Slow when cold (debootstrap and a full image build, several minutes); later runs reuse the base
images and the build cache. Marker ``docker``: ``pytest -m "not docker"`` leaves it out.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import httpx
import pytest
from api_fakes import running
from containers import (
    PROMETHEUS,
    PYTHON_BASE,
    ComposeProject,
    DockerEngine,
    NoDockerEngine,
    docker,
    ensure_images,
    stock_build_inputs,
)
from dashboard import drive_load, queries_without_data
from processes import REPO, PrometheusAPI, ServiceAPI, burst_across_a_stop, free_port, metric_sum, wait_until

from benchmarks.texts import SAMPLE_TEXTS
from service.app import create_app
from service.settings import Settings

pytestmark = [pytest.mark.docker, pytest.mark.integration]

PROJECT = "cogalora-test"
IMAGE = "local/cogalora-serve:test"
MODELS = REPO / "models"
TEXTS = list(SAMPLE_TEXTS[:8])


def committed_adapters() -> list[str]:
    return sorted(path.parent.name for path in MODELS.glob("*/cogalora.json"))


class ContainerService(ServiceAPI):
    """The compose service through its published port; "alive" while its container runs."""

    def __init__(self, compose: ComposeProject, url: str) -> None:
        super().__init__(url)
        self.compose = compose

    def check_alive(self) -> None:
        state = self.compose.inspect("cogalora")["State"]
        if not state["Running"]:
            raise RuntimeError(f"the cogalora container stopped ({state['Status']}):\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.logs()[-chars:]

    def logs(self) -> str:
        return self.compose.run("logs", "--no-color", "cogalora", timeout=60)


@dataclass
class Stack:
    compose: ComposeProject
    service: ContainerService
    prometheus: PrometheusAPI
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    try:
        engine = DockerEngine(tmp_path_factory.mktemp("dockerd"))
    except NoDockerEngine as exc:
        pytest.skip(f"no Docker engine can be started here: {exc}")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("compose")
    timings: dict[str, float] = {}
    started = time.monotonic()
    made = ensure_images([PYTHON_BASE, PROMETHEUS])
    timings["base images" + (f" (made {', '.join(made)})" if made else " (reused)")] = time.monotonic() - started
    print(f"\nbuild inputs: {stock_build_inputs()}")
    service_port, prometheus_port = free_port(), free_port()
    compose = ComposeProject(
        PROJECT,
        {
            "BASE_IMAGE": PYTHON_BASE.tag,
            "COGALORA_IMAGE": IMAGE,
            "PROMETHEUS_IMAGE": PROMETHEUS.tag,
            "COGALORA_HOST_PORT": str(service_port),
            "PROMETHEUS_HOST_PORT": str(prometheus_port),
            # Every routed row shadowed and a short drift window: the fidelity panels get data from a short load.
            "COGALORA_SHADOW_FRACTION": "1",
            "COGALORA_DRIFT_WINDOW": "10",
        },
        log_dir,
    )
    compose.run("down", "-v", "--remove-orphans", timeout=120)  # what a run that died early left behind
    mark = time.monotonic()
    compose.run("build", "cogalora", timeout=1800)
    timings["image build"] = time.monotonic() - mark
    try:
        mark = time.monotonic()
        # As a user runs it; compose waits for the service's healthcheck before it starts Prometheus.
        compose.run("up", "-d", "cogalora", "prometheus", timeout=600)
        service = ContainerService(compose, f"http://127.0.0.1:{service_port}")
        service.wait_ready()
        timings["up to /ready"] = time.monotonic() - mark
        prometheus = PrometheusAPI(f"http://127.0.0.1:{prometheus_port}")
        prometheus.wait_ready()
        yield Stack(compose, service, prometheus, timings)
    finally:
        compose.run("down", "-v", "--remove-orphans", timeout=180)
        timings["total"] = time.monotonic() - started
        print("docker stack timings: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))


async def test_image_serves_the_committed_models_like_the_in_process_service(stack: Stack):
    """The same JSON, to the last digit: same code, same models, same torch build, same CPU."""
    adapters = committed_adapters()
    assert adapters, "no committed models"
    payloads = [{"inputs": inputs, "adapter": name} for name in adapters for inputs in (TEXTS, TEXTS[1])]
    async with httpx.AsyncClient(base_url=stack.service.url, timeout=60, trust_env=False) as client:
        assert (await client.get("/ready")).status_code == 200
        listed = (await client.get("/adapters")).json()["adapters"]
        assert sorted(adapter["name"] for adapter in listed) == adapters
        served = [(await client.post("/classify", json=payload)) for payload in payloads]
        image_kernels = (await client.get("/info")).json()["int8_kernels"]
    assert [response.status_code for response in served] == [200] * len(payloads)
    async with running(create_app(Settings(model_dir=MODELS))) as local:
        expected = [(await local.post("/classify", json=payload)).json() for payload in payloads]
    for payload, response, reference in zip(payloads, served, expected, strict=True):
        assert response.json() == reference, payload
    # The base image has no C compiler, so the image quantizes with torch operations; where this
    # checkout built cogalora/int8_rows.c, the answers above also compare the two paths digit for digit.
    assert image_kernels == "torch"


def test_server_runs_as_non_root_and_the_healthchecks_pass(stack: Stack):
    compose = stack.compose
    # The server itself (PID 1 of the container), not just what `exec` would run as.
    status = compose.run("exec", "-T", "cogalora", "cat", "/proc/1/status", timeout=60)
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert "0" not in uids, f"the server runs with uid {uids}"
    container = compose.inspect("cogalora")
    assert container["Config"]["User"] not in ("", "root", "0")
    # The build stage's wheelhouse and proxy certificates stay in that stage: the image ships neither.
    leftovers = "ls -d /wheels /usr/local/share/ca-certificates/build 2>/dev/null || true"
    assert compose.run("exec", "-T", "cogalora", "sh", "-c", leftovers, timeout=60).strip() == ""

    # compose's healthcheck (/ready) turns the container healthy ...
    def healthy() -> bool:
        health = compose.inspect("cogalora")["State"]["Health"]
        assert health["Status"] != "unhealthy", health["Log"][-1:]
        return health["Status"] == "healthy"

    wait_until(healthy, timeout=180, interval=1.0, what="cogalora container healthy")
    # ... and so does the image's own HEALTHCHECK (the probe `docker run` uses), run in the container.
    image = json.loads(docker("image", "inspect", container["Image"]))[0]
    probe = image["Config"]["Healthcheck"]["Test"]
    assert probe[0] == "CMD"
    docker("exec", container["Id"], *probe[1:], timeout=60)  # raises unless it exits 0
    assert compose.inspect("prometheus")["State"]["Health"]["Status"] in ("starting", "healthy")


def test_prometheus_scrapes_the_service_by_its_compose_name(stack: Stack):
    def target() -> dict | None:
        targets = httpx.get(f"{stack.prometheus.url}/api/v1/targets", timeout=10, trust_env=False).json()
        found = [t for t in targets["data"]["activeTargets"] if t["labels"]["job"] == "cogalora"]
        assert len(found) <= 1, found  # none yet while Prometheus starts up
        return found[0] if found and found[0]["health"] == "up" else None

    scraped = wait_until(target, timeout=60, interval=1.0, what="prometheus target cogalora up")
    assert scraped["scrapeUrl"] == "http://cogalora:8000/metrics"
    assert stack.prometheus.scalar('up{job="cogalora", instance="cogalora:8000"}') == 1.0


def test_dashboard_queries_return_data_after_a_load(stack: Stack):
    adapters = committed_adapters()
    mix = ",".join(f"{name}=1" for name in adapters)
    before = metric_sum(stack.service.metrics_text(), "cogalora_inputs_total")
    report = drive_load(stack.service.url, stack.prometheus, mix)
    problems = queries_without_data(stack.prometheus)
    assert not problems, "queries without data:\n" + "\n".join(problems)
    # Spot check: what Prometheus counted through the compose network is what the load got answered.
    answered = report["inputs"]["ok"] + sum(len(counts) for counts in report["primed"].values())
    assert stack.prometheus.scalar("sum(cogalora_inputs_total)") == before + answered


def drain_burst(url: str, payload: dict) -> int:
    """Requests enough for several seconds of work here (measured alone), within the queue's bounds.

    ``docker-compose stop`` takes a moment to start and to reach the container; the burst must still
    be running when the signal lands.
    """
    started = time.monotonic()
    response = httpx.post(f"{url}/classify", json=payload, timeout=60, trust_env=False)
    response.raise_for_status()
    alone = time.monotonic() - started
    rows_in_queue = Settings.model_fields["max_queue"].default // len(payload["inputs"])
    return max(8, min(rows_in_queue - 4, math.ceil(8.0 / max(alone, 1e-3))))


def test_compose_stop_drains_in_flight_requests_then_down_removes_everything(stack: Stack):
    """Last: stops the stack. Every request sent before `docker-compose stop` is answered with 200."""
    compose, service = stack.compose, stack.service
    texts = list(SAMPLE_TEXTS[-16:])
    payload = {"inputs": texts, "adapter": committed_adapters()[-1]}
    burst = drain_burst(service.url, payload)

    async def stop(_: httpx.AsyncClient) -> None:
        await asyncio.to_thread(compose.run, "stop", timeout=120)

    responses, inflight = asyncio.run(burst_across_a_stop(service.url, payload, burst, stop))
    assert inflight > 0, "the burst finished before the stop began"
    assert [r.status_code for r in responses] == [200] * burst
    assert all(len(r.json()["results"]) == len(texts) for r in responses)

    state = compose.inspect("cogalora")["State"]
    assert (state["Running"], state["ExitCode"], state["OOMKilled"]) == (False, 0, False)
    lines = [json.loads(line.split("|", 1)[1]) for line in service.logs().splitlines() if "| {" in line]
    drain_at = next(i for i, line in enumerate(lines) if "draining" in line.get("msg", ""))
    answered_after = [
        line for line in lines[drain_at:] if line.get("logger") == "cogalora.access" and line.get("status") == 200
    ]
    assert answered_after, "no request was answered after the signal: nothing was drained"
    print(f"\ndrain: {burst} requests, {inflight:.0f} in flight at stop, {len(answered_after)} answered after it")
    assert any(line.get("msg") == "stopped" for line in lines[drain_at:])
    assert "Traceback" not in service.logs()

    compose.run("down", "-v", "--remove-orphans", timeout=180)
    assert compose.leftovers() == []
