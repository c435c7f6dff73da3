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
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]

#: How the Docker image (CMD) and compose start the service; the tests start it the same way.
SERVICE_COMMAND = ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]

SERVICE_START_TIMEOUT_S = 180.0


def service_command(host: str, port: int, model_dir: Path | str | None = None) -> list[str]:
    """``SERVICE_COMMAND`` with another host and port (and optionally a model directory)."""
    command = list(SERVICE_COMMAND)
    command[command.index("--host") + 1] = host
    command[command.index("--port") + 1] = str(port)
    if model_dir is not None:
        command += ["--model-dir", str(model_dir)]
    return command


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last_error, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not reached within {timeout:.0f} s (last error: {last_error!r})")


class ManagedProcess:
    """A child process with its output in a log file; stopped (TERM, then KILL) on close."""

    def __init__(self, name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """TERM, then KILL after ``timeout``; safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()


class ServiceAPI:
    """A running service's HTTP endpoints at ``url`` (a process started here, or a container)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def check_alive(self) -> None:
        """Raise when the server is known to be gone (overridden where its process or container is known)."""

    def log_tail(self, chars: int = 4000) -> str:
        return ""

    def wait_ready(self, timeout: float = SERVICE_START_TIMEOUT_S) -> None:
        def ready() -> bool:
            self.check_alive()
            response = httpx.get(f"{self.url}/ready", timeout=2.0, trust_env=False)
            if response.status_code == 503 and "failed" in response.text:
                # The service stays up with /ready = 503 "not ready: failed": no point waiting.
                raise RuntimeError(f"service failed to load its models:\n{self.log_tail()}")
            return response.status_code == 200

        try:
            wait_until(ready, timeout, what=f"service {self.url}/ready")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- service log ---\n{self.log_tail()}") from exc

    def metrics_text(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=5.0, trust_env=False)
        response.raise_for_status()
        return response.text


class ServiceProcess(ManagedProcess, ServiceAPI):
    """``python -m service`` on a free loopback port, serving ``model_dir``."""

    def __init__(self, model_dir: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        ServiceAPI.__init__(self, f"http://127.0.0.1:{self.port}")
        command = service_command("127.0.0.1", self.port, model_dir)
        command[0] = sys.executable
        env = {key: value for key, value in os.environ.items() if not key.startswith("COGALORA_")}
        env.update({"COGALORA_LOG_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"})
        env.update(extra_env or {})
        super().__init__("service", command, log_path, env)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (exact sample name, e.g. ``cogalora_requests_total``) matching labels."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


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
