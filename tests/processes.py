"""Real processes for the tests (no tests here): the service and Prometheus.

Real processes: the service started exactly as the Docker image starts it (``python -m service
--host ... --port ...``), and a real Prometheus. ``ServiceAPI`` and ``PrometheusAPI`` talk to either
by URL, so the same checks run against the containers of tests/test_docker.py. Every wait polls
with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from benchmarks.processes import (  # noqa: F401 (re-exported for the tests)
    REPO,
    SERVICE_COMMAND,
    ManagedProcess,
    ServiceAPI,
    ServiceProcess,
    engine_pids,
    free_port,
    metric_sum,
    parent_pid,
    process_name,
    service_command,
    wait_until,
)

#: The API key of the shared real service (conftest ``keyed_service``).
API_KEY = "test-key"
#: The admin key of real services that load, install or delete adapters (admin routes are closed without one).
ADMIN_KEY = "test-admin-key"
#: Start-up variables the command-line flags must win over (``ServiceProcess`` passes --host/--port).
IGNORED_BY_FLAGS = {"COGALORA_PORT": "1", "COGALORA_HOST": "203.0.113.1"}


def run_service_once(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m service ARGS`` to its end (``--help``, ``--print-settings``, a start that must fail),
    with ``env`` as its only ``COGALORA_*`` variables; stdout and stderr captured apart."""
    environment = {key: value for key, value in os.environ.items() if not key.upper().startswith("COGALORA_")}
    environment.update(env)
    command = [sys.executable, "-m", "service", *args]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


async def burst_across_a_stop(
    url: str, payload: dict, burst: int, stop: Callable[[httpx.AsyncClient], Awaitable[None]], timeout: float = 60
) -> tuple[list[httpx.Response], float]:
    """Send ``burst`` concurrent /classify requests, and once every one has reached the service (in flight
    or answered, by its own metrics), await ``stop(client)`` while they finish.

    Returns the responses in order and how many requests were in flight when ``stop`` began. One
    connection per request, so a stop that closes idle keep-alive connections cannot drop any.
    """
    limits = httpx.Limits(max_connections=burst + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as client:
        before = metric_sum((await client.get("/metrics")).text, "cogalora_requests_total")
        tasks = [asyncio.create_task(client.post("/classify", json=payload)) for _ in range(burst)]
        deadline = time.monotonic() + timeout
        while True:
            page = (await client.get("/metrics")).text
            inflight = metric_sum(page, "cogalora_inflight_requests")
            done = metric_sum(page, "cogalora_requests_total") - before
            if inflight + done >= burst:
                break
            assert time.monotonic() < deadline, f"only {inflight + done:.0f} of {burst} requests reached the service"
            await asyncio.sleep(0.01)
        await stop(client)
        responses = await asyncio.gather(*tasks)
    return list(responses), inflight


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


class PrometheusAPI:
    """A Prometheus server's HTTP API at ``url`` (a process started here, or one in a container)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def check_alive(self) -> None:
        """Raise when the server is known to be gone (overridden where the process is ours)."""

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            self.check_alive()
            return httpx.get(f"{self.url}/-/ready", timeout=2.0, trust_env=False).status_code == 200

        wait_until(ready, timeout, what="prometheus /-/ready")

    def query(self, expr: str) -> dict:
        """Instant query; returns ``data`` (``resultType``, ``result``); raises on a PromQL error."""
        response = httpx.post(f"{self.url}/api/v1/query", data={"query": expr}, timeout=10.0, trust_env=False)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"query failed ({response.status_code}): {expr}\n{body}")
        return body["data"]

    def scalar(self, expr: str) -> float | None:
        """The single value of a one-series instant query, or None when it returns nothing."""
        result = self.query(expr)["result"]
        if not result:
            return None
        return float(result[0]["value"][1])


class PrometheusProcess(ManagedProcess, PrometheusAPI):
    """A real Prometheus scraping ``targets`` every ``scrape_interval``, with storage in ``workdir``."""

    def __init__(self, workdir: Path, job: str, targets: list[str], scrape_interval: str = "1s") -> None:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed")
        self.port = free_port()
        PrometheusAPI.__init__(self, f"http://127.0.0.1:{self.port}")
        config = workdir / "prometheus.yml"
        quoted = ", ".join(f'"{target}"' for target in targets)
        config.write_text(
            "global:\n"
            f"  scrape_interval: {scrape_interval}\n"
            f"  evaluation_interval: {scrape_interval}\n"
            "scrape_configs:\n"
            f"  - job_name: {job}\n"
            "    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: [{quoted}]\n",
            encoding="utf-8",
        )
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        super().__init__("prometheus", command, workdir / "prometheus.log")
