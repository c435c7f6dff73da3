"""Resident memory of the running service under mixed traffic: the API process and the engine processes.

Starts ``python -m service`` on the model directory (default: the committed adapters in models/),
waits for ``/ready`` and records the resident set size (RSS, from /proc) of the API process, of its
engine processes and of the template they are forked from (``service.engine_launcher``); then
sends ``--requests`` requests of 1 to ``--max-inputs`` inputs each, over every adapter the service
lists (or ``--adapters``), from ``--concurrency`` closed-loop clients, sampling every process every
``--interval`` seconds. It reports, per process and for all together, memory right after ready, the
peak under traffic, at the last answer and after ``--idle`` seconds without traffic; and the
throughput it saw, so that a change that saves memory at the cost of speed shows. RSS counts the
pages of shared libraries (torch's) and of the template in each process; PSS divides shared pages
among the processes, so the processes' PSS add up to what they take together.

    python -m benchmarks.memory --requests 12000 --output runs/memory.json
    python -m benchmarks.memory --requests 2000 --env COGALORA_ENGINE_LANES=1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.loadtest import LoadTestConfig, run_load
from benchmarks.processes import REPO, ServiceProcess, descendants, engine_pids, parent_pid, process_name
from benchmarks.texts import SAMPLE_TEXTS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, default=REPO / "models", help="model repository")
    parser.add_argument("--requests", type=int, default=12_000, help="requests to send")
    parser.add_argument("--max-inputs", type=int, default=16, help="inputs per request: uniform in 1..this")
    parser.add_argument(
        "--adapters", default=None, help="comma-separated adapters to spread requests over (default: all served)"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds without traffic before the last sample")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the service (repeatable), e.g. COGALORA_ENGINE_LANES=1",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for adapters, input counts and texts")
    parser.add_argument("--output", type=Path, help="write the results (and every RSS sample) as JSON here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.max_inputs < 1 or args.concurrency < 1 or args.interval <= 0 or args.idle < 0:
        parser.error("--requests, --max-inputs and --concurrency must be >= 1, --interval > 0, --idle >= 0")
    if any("=" not in item for item in args.env):
        parser.error("--env takes NAME=VALUE")
    return args


# ---- reading /proc --------------------------------------------------------------------------------


def memory_mb(pid: int) -> dict[str, float | None]:
    """Resident set size (RSS) and proportional set size (PSS: shared pages divided among the processes
    that map them, so PSS adds up across processes) of ``pid``, in MB (10^6 bytes); None once gone."""
    found: dict[str, float | None] = {"rss": None, "pss": None}
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return found
    for line in rollup.splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss"):
            found[key.lower()] = int(value.split()[0]) * 1024 / 1e6
    return found


def helper_name(pid: int) -> str:
    """A name for a helper process of the service: multiprocessing's resource tracker, or its name and pid."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        command = b""
    return "resource tracker" if b"resource_tracker" in command else f"{process_name(pid)} {pid}"


# ---- sampling -------------------------------------------------------------------------------------


@dataclass
class Sampler:
    """Samples the memory of a few processes on a thread of its own, every ``interval`` seconds."""

    pids: dict[str, int]
    interval: float
    samples: list[dict[str, float | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> dict[str, float | None]:
        """One sample: ``{"t", "<process>_rss", "<process>_pss", ...}``."""
        row: dict[str, float | None] = {"t": time.monotonic()}
        for name, pid in self.pids.items():
            row.update({f"{name}_{kind}": value for kind, value in memory_mb(pid).items()})
        self.samples.append(row)
        return row

    def __enter__(self) -> Sampler:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.sample()

        self._thread = threading.Thread(target=loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def total(self, row: dict[str, float | None], kind: str) -> float:
        return sum(row[f"{name}_{kind}"] or 0.0 for name in self.pids)

    def summary(self, moments: dict[str, dict[str, float | None]]) -> dict[str, dict[str, dict[str, float]]]:
        """``{kind: {process or "together": {moment or "peak": MB}}}`` for RSS and PSS."""
        found: dict[str, dict[str, dict[str, float]]] = {}
        for kind in ("rss", "pss"):
            table = found[kind] = {}
            for name in self.pids:
                key = f"{name}_{kind}"
                table[name] = {moment: row[key] or 0.0 for moment, row in moments.items()}
                table[name]["peak"] = max(row[key] or 0.0 for row in self.samples)
            table["together"] = {moment: self.total(row, kind) for moment, row in moments.items()}
            table["together"]["peak"] = max(self.total(row, kind) for row in self.samples)
        return found


def served_adapters(url: str) -> list[str]:
    response = httpx.get(f"{url}/info", timeout=10.0, trust_env=False)
    response.raise_for_status()
    return list(response.json()["adapters"])


# ---- the run ------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    env = dict(item.split("=", 1) for item in args.env)
    server = ServiceProcess(args.model_dir, scratch / "service.log", extra_env=env)
    try:
        server.wait_ready()
        adapters = args.adapters.split(",") if args.adapters else served_adapters(server.url)
        pids = {"api": server.proc.pid}
        engines = engine_pids(server.proc.pid)
        for index, engine in enumerate(engines):
            pids["engine" if len(engines) == 1 else f"engine {index + 1}"] = engine
        templates = {parent_pid(engine) for engine in engines} - {server.proc.pid}
        for pid in sorted(set(descendants(server.proc.pid)) - set(engines)):
            # The template the engines are forked from, and its helper (multiprocessing's resource tracker).
            pids["engine template" if pid in templates else helper_name(pid)] = pid
        sampler = Sampler(pids, args.interval)
        ready = sampler.sample()
        config = LoadTestConfig(
            url=server.url,
            concurrency=args.concurrency,
            requests=args.requests,
            adapter_mix=[(name, 1.0) for name in adapters],
            texts=SAMPLE_TEXTS,
            batch=1,
            batch_max=args.max_inputs,
            timeout=120.0,
            seed=args.seed,
        )
        print(f"ready; {args.requests} requests over {', '.join(adapters)}, {args.concurrency} clients", flush=True)
        with sampler:
            load = asyncio.run(run_load(config))
            last = sampler.sample()
            time.sleep(args.idle)
        idle = sampler.sample()
        server.check_alive()
    finally:
        server.stop()
    memory = sampler.summary({"ready": ready, "last_answer": last, "idle": idle})
    load.pop("_records", None)
    start = sampler.samples[0]["t"]
    return {
        "model_dir": str(args.model_dir),
        "adapters": adapters,
        "env": env,
        "requests": load["requests"],
        "throughput": load["throughput"],
        "latency_s": {key: load["latency_s"][key] for key in ("p50", "p99")},
        "wall_time_s": load["wall_time_s"],
        "memory_mb": memory,
        "samples": [{"t": row["t"] - start, **{k: v for k, v in row.items() if k != "t"}} for row in sampler.samples],
    }


def print_report(report: dict) -> None:
    requests, throughput = report["requests"], report["throughput"]
    print(
        f"\n{requests['ok']} of {requests['sent']} requests answered 2xx in {report['wall_time_s']:.0f} s: "
        f"{throughput['requests_per_s']:.1f} req/s, {throughput['inputs_per_s']:.1f} inputs/s "
        f"(p50 {1000 * report['latency_s']['p50']:.0f} ms, p99 {1000 * report['latency_s']['p99']:.0f} ms)"
    )
    for kind, title in (("rss", "RSS"), ("pss", "PSS (shared pages divided among the processes)")):
        print(f"\n{title}, MB | after /ready | peak under traffic | at the last answer | after idle")
        print("|---|---|---|---|---|")
        for name, values in report["memory_mb"][kind].items():
            cells = [f"{values[moment]:.0f}" for moment in ("ready", "peak", "last_answer", "idle")]
            print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path("/proc/self/status").is_file():
        print("error: this benchmark reads /proc (Linux only)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        report = measure(args, Path(scratch))
    print_report(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    return 0 if report["requests"]["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
