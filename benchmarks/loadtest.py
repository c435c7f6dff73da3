"""HTTP load tester for ``POST /classify`` (the service, or the naive baseline with the same API).

Two modes, both bounded by ``--requests`` and/or ``--duration``:

* closed loop (default): ``--concurrency N`` workers, each sends its next request as soon as
  the previous one is answered;
* open loop: ``--rate R`` requests per second arrive on a schedule (Poisson by default),
  whether or not earlier ones have been answered, so queueing shows up as latency.

At the end it prints latency percentiles, throughput, outcomes by status and the mean number
of active adapters per input, and can write a JSON report (``--output``) and a PNG plot of
latency over time and its histogram (``--plot``). It only targets loopback addresses.

Exit status: 0 when every request was answered with 2xx (or with 429/503 rejections, unless
``--fail-on-reject``); 1 on any unexpected failure (transport errors, other 4xx/5xx, malformed
responses) or when nothing succeeded; 2 on rejections with ``--fail-on-reject``.

    python -m benchmarks.loadtest --url http://127.0.0.1:8000 --concurrency 16 --duration 30 \\
        --adapter-mix sst2=0.7,agnews=0.3 --output report.json --plot latency.png
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import socket
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from benchmarks.texts import SAMPLE_TEXTS

DEFAULT_URL = "http://127.0.0.1:8000"
REJECT_STATUSES = frozenset({429, 503})
PERCENTILES = (50, 90, 95, 99)

OK, REJECTED, ERROR = "ok", "rejected", "error"


# ---- configuration --------------------------------------------------------------------------


@dataclass
class LoadTestConfig:
    url: str = DEFAULT_URL
    concurrency: int = 8
    """Closed-loop workers; ignored when ``rate`` is set."""
    rate: float | None = None
    """Open-loop arrival rate (requests/s)."""
    arrival: str = "poisson"
    """Open-loop arrivals: ``poisson`` (exponential gaps) or ``constant``."""
    duration: float | None = None
    requests: int | None = None
    adapter_mix: list[tuple[str | None, float]] = field(default_factory=lambda: [(None, 1.0)])
    texts: Sequence[str] = SAMPLE_TEXTS
    batch: int = 1
    batch_max: int | None = None
    """Inputs per request drawn uniformly from ``batch..batch_max`` (None: always ``batch``)."""
    threshold: float | None = None
    api_key: str | None = None
    timeout: float = 30.0
    max_inflight: int = 1000
    """Open loop: arrivals beyond this many unanswered requests are dropped (and count as errors)."""
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.requests is None and self.duration is None:
            raise ValueError("give --requests and/or --duration: the load test must be bounded")
        if self.requests is not None and self.requests < 1:
            raise ValueError("--requests must be >= 1")
        if self.duration is not None and not (0 < self.duration <= 24 * 3600):
            raise ValueError("--duration must be in (0, 86400] seconds")
        if self.rate is not None and not (0 < self.rate <= 100_000):
            raise ValueError("--rate must be in (0, 100000] requests/s")
        if self.concurrency < 1 or self.concurrency > 10_000:
            raise ValueError("--concurrency must be in [1, 10000]")
        if self.batch < 1:
            raise ValueError("--batch must be >= 1")
        if self.batch_max is not None and self.batch_max < self.batch:
            raise ValueError("--batch-max must be >= --batch")
        if self.timeout <= 0:
            raise ValueError("--timeout must be > 0")
        if self.max_inflight < 1:
            raise ValueError("--max-inflight must be >= 1")
        if self.arrival not in ("poisson", "constant"):
            raise ValueError("--arrival must be 'poisson' or 'constant'")
        if not self.texts:
            raise ValueError("no texts to send")
        if not self.adapter_mix or sum(weight for _, weight in self.adapter_mix) <= 0:
            raise ValueError("the adapter mix needs a positive total weight")
        check_loopback(self.url)

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("texts")
        data.pop("api_key")
        data["mode"] = self.mode
        data["texts_count"] = len(self.texts)
        data["adapter_mix"] = {name or "(server default)": weight for name, weight in self.adapter_mix}
        return data


def parse_adapter_mix(text: str | None) -> list[tuple[str | None, float]]:
    """``"sst2=0.7,agnews=0.3"`` → ``[("sst2", 0.7), ("agnews", 0.3)]``; empty/``none`` → server default.

    A bare name (``"sst2"``) has weight 1. Weights need not sum to 1; they are normalised.
    """
    if text is None or text.strip().lower() in ("", "none", "default"):
        return [(None, 1.0)]
    mix: list[tuple[str | None, float]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight_text = part.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"adapter mix entry {part!r} has no adapter name")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError as exc:
            raise ValueError(f"adapter mix entry {part!r}: weight is not a number") from exc
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"adapter mix entry {part!r}: weight must be finite and >= 0")
        mix.append((name, weight))
    if not mix or sum(weight for _, weight in mix) <= 0:
        raise ValueError(f"adapter mix {text!r} has no positive weight")
    return mix


def read_texts(path: Path) -> list[str]:
    """One text per line; blank lines are skipped."""
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [line for line in texts if line]
    if not texts:
        raise ValueError(f"{path}: no non-empty lines")
    return texts


def check_loopback(url: str) -> None:
    """Refuse any target that is not a loopback address: this tool is for local load only."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url {url!r} is not an http(s) URL with a host")
    host = parts.hostname
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise ValueError(f"--url host {host!r} does not resolve: {exc}") from exc
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    if not addresses or not all(address.is_loopback for address in addresses):
        raise ValueError(f"--url host {host!r} is not a loopback address; this load tester only targets loopback")


# ---- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics.

    The same definition as ``numpy.percentile(..., method="linear")``; ``None`` for no values.
    """
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def latency_summary(latencies: Sequence[float]) -> dict[str, float | int | None]:
    summary: dict[str, float | int | None] = {"count": len(latencies)}
    summary["mean"] = sum(latencies) / len(latencies) if latencies else None
    summary["min"] = min(latencies) if latencies else None
    for q in PERCENTILES:
        summary[f"p{q}"] = percentile(latencies, q)
    summary["max"] = max(latencies) if latencies else None
    return summary


@dataclass
class RequestRecord:
    """One request's fate. Times are seconds; ``start`` is relative to the start of the test."""

    start: float
    latency: float
    adapter: str | None
    inputs: int
    status: int | None
    """HTTP status, or ``None`` when no response came back (transport error, client drop)."""
    outcome: str
    """``ok``, ``rejected`` (429/503) or ``error``."""
    error: str | None = None
    active_adapters: list[int] = field(default_factory=list)
    total_adapters: list[int] = field(default_factory=list)


def classify_response(status: int, body: Any, inputs: int) -> tuple[str, str | None, list[int], list[int]]:
    """Outcome, error kind, active and total adapters per input, from a status and a decoded body."""
    if status in REJECT_STATUSES:
        return REJECTED, None, [], []
    if not 200 <= status < 300:
        return ERROR, f"http_{status}", [], []
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != inputs:
        return ERROR, "bad_response", [], []
    active: list[int] = []
    total: list[int] = []
    for result in results:
        if not isinstance(result, dict) or not isinstance(result.get("label"), str):
            return ERROR, "bad_response", [], []
        if isinstance(result.get("active_adapters"), int):
            active.append(result["active_adapters"])
        if isinstance(result.get("total_adapters"), int):
            total.append(result["total_adapters"])
    return OK, None, active, total


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_report(records: Sequence[RequestRecord], wall_time_s: float, config: LoadTestConfig | None = None) -> dict:
    """Aggregate per-request records into the report (also what ``--output`` writes)."""
    ok = [r for r in records if r.outcome == OK]
    rejected = [r for r in records if r.outcome == REJECTED]
    errors = [r for r in records if r.outcome == ERROR]
    answered = [r for r in records if r.status is not None]
    status_counts = Counter(str(r.status) for r in answered)
    error_counts = Counter(r.error or "unknown" for r in errors)
    active = [count for r in ok for count in r.active_adapters]
    total = [count for r in ok for count in r.total_adapters]
    ok_inputs = sum(r.inputs for r in ok)

    per_adapter: dict[str, dict[str, Any]] = {}
    grouped: dict[str, list[RequestRecord]] = defaultdict(list)
    for record in records:
        grouped[record.adapter or "(server default)"].append(record)
    for name, group in sorted(grouped.items()):
        group_ok = [r for r in group if r.outcome == OK]
        group_active = [count for r in group_ok for count in r.active_adapters]
        lat = [r.latency for r in group_ok]
        per_adapter[name] = {
            "sent": len(group),
            "ok": len(group_ok),
            "rejected": sum(r.outcome == REJECTED for r in group),
            "errors": sum(r.outcome == ERROR for r in group),
            "inputs_ok": sum(r.inputs for r in group_ok),
            "latency_p50_s": percentile(lat, 50),
            "latency_p99_s": percentile(lat, 99),
            "active_adapters_mean": _mean(group_active),
        }

    wall = max(wall_time_s, 1e-9)
    report = {
        "tool": "benchmarks.loadtest",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config.describe() if config else None,
        "wall_time_s": wall_time_s,
        "requests": {
            "sent": len(records),
            "answered": len(answered),
            "ok": len(ok),
            "rejected": len(rejected),
            "errors": len(errors),
            "transport_errors": sum(r.status is None for r in records),
        },
        "status_counts": dict(sorted(status_counts.items())),
        "error_counts": dict(sorted(error_counts.items())),
        "inputs": {"sent": sum(r.inputs for r in records), "ok": ok_inputs},
        "latency_s": latency_summary([r.latency for r in ok]),
        "throughput": {"requests_per_s": len(ok) / wall, "inputs_per_s": ok_inputs / wall},
        "active_adapters": {
            "mean": _mean(active),
            "min": min(active) if active else None,
            "max": max(active) if active else None,
            "total_adapters_mean": _mean(total),
        },
        "per_adapter": per_adapter,
    }
    report["passed"] = not errors and bool(ok)
    return report


def exit_code(report: dict, fail_on_reject: bool = False) -> int:
    counts = report["requests"]
    if counts["errors"] or not counts["ok"]:
        return 1
    if fail_on_reject and counts["rejected"]:
        return 2
    return 0


# ---- running --------------------------------------------------------------------------------


class _Plan:
    """Deterministic request contents: which adapter and which texts, drawn from a seeded RNG."""

    def __init__(self, config: LoadTestConfig) -> None:
        self.rng = random.Random(config.seed)
        self.config = config
        self.names = [name for name, _ in config.adapter_mix]
        self.weights = [weight for _, weight in config.adapter_mix]

    def next(self) -> tuple[str | None, dict[str, Any]]:
        adapter = self.rng.choices(self.names, weights=self.weights)[0]
        size = self.config.batch
        if self.config.batch_max is not None:
            size = self.rng.randint(self.config.batch, self.config.batch_max)
        texts = [self.rng.choice(self.config.texts) for _ in range(size)]
        payload: dict[str, Any] = {"inputs": texts[0] if self.config.batch_max is None and size == 1 else texts}
        if adapter is not None:
            payload["adapter"] = adapter
        if self.config.threshold is not None:
            payload["threshold"] = self.config.threshold
        return adapter, payload


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _send(client: httpx.AsyncClient, url: str, adapter: str | None, payload: dict, t0: float) -> RequestRecord:
    inputs = len(payload["inputs"]) if isinstance(payload["inputs"], list) else 1
    start = time.perf_counter()
    try:
        response = await client.post(url, json=payload)
    except httpx.HTTPError as exc:
        latency = time.perf_counter() - start
        return RequestRecord(start - t0, latency, adapter, inputs, None, ERROR, f"transport:{type(exc).__name__}")
    except Exception as exc:  # anything else is still one failed request, never a lost one
        latency = time.perf_counter() - start
        return RequestRecord(start - t0, latency, adapter, inputs, None, ERROR, f"client:{type(exc).__name__}")
    latency = time.perf_counter() - start
    try:
        body = response.json()
    except ValueError:
        body = None
    outcome, error, active, total = classify_response(response.status_code, body, inputs)
    return RequestRecord(start - t0, latency, adapter, inputs, response.status_code, outcome, error, active, total)


def _progress(config: LoadTestConfig):
    from tqdm import tqdm

    return tqdm(
        total=config.requests,
        unit="req",
        disable=not config.progress,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 5.0,
        desc=f"{config.mode}-loop",
    )


async def _closed_loop(client, config, plan, records, bar, endpoint, t0) -> None:
    issued = 0
    deadline = t0 + config.duration if config.duration is not None else math.inf

    def take() -> bool:
        nonlocal issued
        if config.requests is not None and issued >= config.requests:
            return False
        if time.perf_counter() >= deadline:
            return False
        issued += 1
        return True

    async def worker() -> None:
        while take():
            adapter, payload = plan.next()
            record = await _send(client, endpoint, adapter, payload, t0)
            records.append(record)
            bar.update(1)

    await asyncio.gather(*(worker() for _ in range(config.concurrency)))


async def _open_loop(client, config, plan, records, bar, endpoint, t0) -> None:
    limit = config.requests if config.requests is not None else math.ceil(config.rate * config.duration) + 1
    inflight: set[asyncio.Task] = set()
    arrival = 0.0
    for index in range(limit):
        if index:
            gap = 1.0 / config.rate
            arrival += plan.rng.expovariate(config.rate) if config.arrival == "poisson" else gap
        if config.duration is not None and arrival >= config.duration:
            break
        delay = t0 + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        adapter, payload = plan.next()
        if len(inflight) >= config.max_inflight:
            inputs = len(payload["inputs"]) if isinstance(payload["inputs"], list) else 1
            records.append(RequestRecord(arrival, 0.0, adapter, inputs, None, ERROR, "client:max_inflight"))
            bar.update(1)
            continue
        task = asyncio.create_task(_send(client, endpoint, adapter, payload, t0))

        def done(finished: asyncio.Task) -> None:
            inflight.discard(finished)
            if not finished.cancelled() and finished.exception() is None:
                records.append(finished.result())
            bar.update(1)

        inflight.add(task)
        task.add_done_callback(done)
    if inflight:
        await asyncio.gather(*list(inflight), return_exceptions=True)


async def run_load(config: LoadTestConfig) -> dict:
    """Run one bounded load test and return its report (see :func:`build_report`)."""
    config.validate()
    endpoint = config.url.rstrip("/") + "/classify"
    plan = _Plan(config)
    records: list[RequestRecord] = []
    width = config.max_inflight if config.rate is not None else config.concurrency
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    timeout = httpx.Timeout(config.timeout)
    # trust_env=False: never route loopback load through an HTTP proxy from the environment.
    headers = _headers(config.api_key)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers, trust_env=False) as client:
        with _progress(config) as bar:
            t0 = time.perf_counter()
            if config.rate is None:
                await _closed_loop(client, config, plan, records, bar, endpoint, t0)
            else:
                await _open_loop(client, config, plan, records, bar, endpoint, t0)
            wall = time.perf_counter() - t0
    records.sort(key=lambda r: r.start)
    report = build_report(records, wall, config)
    report["_records"] = records
    return report


def run(config: LoadTestConfig) -> dict:
    """Synchronous wrapper of :func:`run_load`."""
    return asyncio.run(run_load(config))


# ---- output ---------------------------------------------------------------------------------


def _fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def format_report(report: dict) -> str:
    counts = report["requests"]
    latency = report["latency_s"]
    throughput = report["throughput"]
    active = report["active_adapters"]
    lines = [
        f"requests   sent {counts['sent']}  answered {counts['answered']}  ok {counts['ok']}  "
        f"rejected {counts['rejected']}  errors {counts['errors']}  (wall {report['wall_time_s']:.2f} s)",
        f"status     {', '.join(f'{code}: {n}' for code, n in report['status_counts'].items()) or '-'}",
    ]
    if report["error_counts"]:
        lines.append(f"errors     {', '.join(f'{kind}: {n}' for kind, n in report['error_counts'].items())}")
    lines += [
        f"latency    p50 {_fmt_ms(latency['p50'])}  p90 {_fmt_ms(latency['p90'])}  p99 {_fmt_ms(latency['p99'])}  "
        f"mean {_fmt_ms(latency['mean'])}  max {_fmt_ms(latency['max'])}",
        f"throughput {throughput['requests_per_s']:.1f} req/s  {throughput['inputs_per_s']:.1f} inputs/s",
    ]
    if active["mean"] is not None:
        total = active["total_adapters_mean"]
        of_total = f" of {total:.0f}" if total is not None else ""
        lines.append(f"adapters   mean active per input {active['mean']:.2f}{of_total}")
    for name, stats in report["per_adapter"].items():
        mean_active = "-" if stats["active_adapters_mean"] is None else f"{stats['active_adapters_mean']:.2f}"
        lines.append(
            f"  {name:<18} ok {stats['ok']:>6}/{stats['sent']:<6} p50 {_fmt_ms(stats['latency_p50_s'])}  "
            f"p99 {_fmt_ms(stats['latency_p99_s'])}  active {mean_active}"
        )
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    data = {key: value for key, value in report.items() if not key.startswith("_")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def plot(report: dict, path: Path) -> None:
    """PNG: latency of every request over time (by outcome), and the histogram of successful latencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records: list[RequestRecord] = report["_records"]
    fig, (ax_time, ax_hist) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {OK: "tab:blue", REJECTED: "tab:orange", ERROR: "tab:red"}
    for outcome, color in colors.items():
        chosen = [r for r in records if r.outcome == outcome and r.status is not None]
        if chosen:
            ax_time.scatter(
                [r.start + r.latency for r in chosen],
                [r.latency * 1000 for r in chosen],
                s=4,
                alpha=0.6,
                color=color,
                label=f"{outcome} ({len(chosen)})",
            )
    ax_time.set_xlabel("time since start (s, at completion)")
    ax_time.set_ylabel("latency (ms)")
    ax_time.set_title("latency over time")
    if ax_time.has_data():
        ax_time.legend(loc="upper left")
    latencies = [r.latency * 1000 for r in records if r.outcome == OK]
    if latencies:
        ax_hist.hist(latencies, bins=min(60, max(10, len(latencies) // 10)), color="tab:blue", alpha=0.8)
        for q, style in ((50, "-"), (90, "--"), (99, ":")):
            value = percentile(latencies, q)
            ax_hist.axvline(value, color="black", linestyle=style, label=f"p{q} {value:.1f} ms")
        ax_hist.legend()
    ax_hist.set_xlabel("latency (ms)")
    ax_hist.set_ylabel("requests")
    ax_hist.set_title("latency histogram (ok requests)")
    config = report.get("config") or {}
    fig.suptitle(
        f"{config.get('mode', '?')}-loop load on {config.get('url', '?')}: "
        f"{report['throughput']['requests_per_s']:.1f} req/s, {report['requests']['ok']} ok"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- CLI ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loadtest",
        description="Load-test POST /classify over HTTP (loopback only), closed- or open-loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="service base URL (loopback only)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", "-c", type=int, default=8, help="closed loop: concurrent workers")
    mode.add_argument("--rate", "-r", type=float, default=None, help="open loop: arrivals per second")
    parser.add_argument("--arrival", choices=("poisson", "constant"), default="poisson", help="open-loop arrivals")
    parser.add_argument(
        "--duration",
        "-d",
        type=float,
        default=None,
        help="seconds to send for (10 when neither this nor --requests is given)",
    )
    parser.add_argument("--requests", "-n", type=int, default=None, help="number of requests to send")
    parser.add_argument(
        "--adapter-mix",
        default=None,
        help="weighted adapters, e.g. 'sst2=0.7,agnews=0.3'; none = let the server pick its default",
    )
    parser.add_argument("--texts", type=Path, default=None, help="text file, one input per line (default: built-in)")
    parser.add_argument("--batch", "-b", type=int, default=1, help="inputs per request")
    parser.add_argument(
        "--batch-max", type=int, default=None, help="inputs per request drawn uniformly from --batch..--batch-max"
    )
    parser.add_argument("--threshold", type=float, default=None, help="per-request gate threshold override")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    parser.add_argument("--max-inflight", type=int, default=1000, help="open loop: cap on unanswered requests")
    parser.add_argument("--seed", type=int, default=0, help="seed for texts, adapters and arrivals")
    parser.add_argument("--fail-on-reject", action="store_true", help="exit 2 when any request got 429/503")
    parser.add_argument("--output", "-o", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of latency over time + histogram")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    requests, duration = args.requests, args.duration
    if requests is None and duration is None:
        duration = 10.0
    try:
        config = LoadTestConfig(
            url=args.url,
            concurrency=args.concurrency,
            rate=args.rate,
            arrival=args.arrival,
            duration=duration,
            requests=requests,
            adapter_mix=parse_adapter_mix(args.adapter_mix),
            texts=read_texts(args.texts) if args.texts else SAMPLE_TEXTS,
            batch=args.batch,
            batch_max=args.batch_max,
            threshold=args.threshold,
            api_key=args.api_key,
            timeout=args.timeout,
            max_inflight=args.max_inflight,
            seed=args.seed,
            progress=not args.no_progress,
        )
        config.validate()
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    report = run(config)
    print(format_report(report))
    if args.output:
        write_json(report, args.output)
        print(f"report     {args.output}")
    if args.plot:
        plot(report, args.plot)
        print(f"plot       {args.plot}")
    return exit_code(report, args.fail_on_reject)


if __name__ == "__main__":
    sys.exit(main())
