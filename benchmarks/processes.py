"""Child processes for benchmarks and tests: the service started as the Docker image starts it.

Every wait polls with a deadline; every child is stopped with TERM, then KILL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from service.engine_launcher import ENGINE_PROCESS_NAME

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


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc (Linux)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def process_name(pid: int) -> str | None:
    """``pid``'s name as ``ps`` shows it (/proc/PID/comm), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def parent_pid(pid: int) -> int | None:
    """``pid``'s parent (/proc/PID/stat), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])  # after "pid (name) state"


def engine_pids(api_pid: int) -> list[int]:
    """The engine processes of the service whose API process is ``api_pid`` (none: the engine runs inside it)."""
    return sorted(pid for pid in descendants(api_pid) if process_name(pid) == ENGINE_PROCESS_NAME)


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
    """``python -m service`` on a free loopback port, serving ``model_dir``.

    ``command`` replaces the service with another server of the same API taking ``--port``
    (the naive baseline); ``COGALORA_*`` variables of this process are not inherited.
    """

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        extra_env: dict[str, str] | None = None,
        command: list[str] | None = None,
        name: str = "service",
    ) -> None:
        self.port = free_port()
        ServiceAPI.__init__(self, f"http://127.0.0.1:{self.port}")
        if command is None:
            command = service_command("127.0.0.1", self.port, model_dir)
            command[0] = sys.executable
        else:
            command = [*command, "--port", str(self.port), "--model-dir", str(model_dir)]
        env = {key: value for key, value in os.environ.items() if not key.startswith("COGALORA_")}
        env.update({"COGALORA_LOG_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"})
        env.update(extra_env or {})
        super().__init__(name, command, log_path, env)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (exact sample name, e.g. ``cogalora_requests_total``) matching labels."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
