"""Served throughput and latency through HTTP, against the naive server and the bare encoder, one run.

Every figure comes from the same run on the same sentences (real full SST-2 sentences, one per
request):

1. what a user would run instead, offline at batch 32 (``benchmarks.baselines``): the bare encoder
   + head in torch (float32, bfloat16, dynamic int8) and in ONNX Runtime (float32, int8). Torch
   float32 is the yardstick every throughput is a ratio to. Each is the median of five rounds, the
   baselines taking turns;
2. each server (the service in each ``--dtypes`` and ``--modes``, then the naive FastAPI + PEFT
   server) under ``--concurrency`` closed-loop clients, measured with ``wrk`` (a C load generator:
   it leaves the two cores to the server) and with this project's httpx load tester; for the
   service also the engine alone, offline, at the batch size it formed under that load (its
   ``cogalora_batch_size``), with the engine's own thread count: what serving costs on top;
3. with ``--sweep``: the service under open-loop Poisson arrivals at fractions of its maximum
   throughput, p50/p99 latency against offered load (``--plot`` writes the PNG), beside the
   latency of a lone request (back to back, and 20 ms apart so that each finds the server idle), all
   measured by ``benchmarks.open_loop`` (a lean client: 0.2-0.3 ms
   of CPU per request, latency from each request's scheduled arrival) or, with
   ``--sweep-client httpx``, by the project's load tester (about a millisecond per request, taken
   from the server on two cores).

    python -m benchmarks.serving --duration 20 --sweep --plot runs/latency_vs_load.png \\
        --output runs/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.baselines import baseline_rates
from benchmarks.open_loop import IDLE_PAUSE_S, run_open_loop, run_sequential
from benchmarks.processes import ServiceProcess, metric_sum

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2-sentences" / "dev.tsv"
NAIVE_COMMAND = [sys.executable, "-m", "benchmarks.naive_server", "--host", "127.0.0.1"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models", help="model repository (default: models/)")
    parser.add_argument("--adapter", default="sst2", help="adapter every request names (default: sst2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TSV, sentences in the first column")
    parser.add_argument("--sentences", type=int, default=1000, help="distinct sentences sent in turn (default: 1000)")
    parser.add_argument("--dtypes", default="auto", help="service precisions to measure (default: auto)")
    parser.add_argument(
        "--modes",
        default="process",
        help="process (the engine in its own process, the default service) and/or inprocess (one process)",
    )
    parser.add_argument("--torch-threads", default="0", help="service torch_threads values, comma-separated")
    parser.add_argument(
        "--engine-processes",
        default="0",
        help="service engine_processes values, comma-separated (default: 0, auto: one per lane on CPUs)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (default: 32)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement (default: 20)")
    parser.add_argument("--clients", default="wrk,httpx", help="load generators: wrk and/or httpx")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive server")
    parser.add_argument("--sweep", action="store_true", help="open-loop latency against offered load")
    parser.add_argument("--sweep-fractions", default="0.1,0.25,0.5,0.7,0.85,1.0", help="of the measured maximum")
    parser.add_argument(
        "--sweep-client",
        choices=("lean", "httpx"),
        default="lean",
        help="open-loop client of the sweep: benchmarks.open_loop (default) or the httpx load tester",
    )
    parser.add_argument("--plot", type=Path, help="PNG of p50/p99 latency against offered load (with --sweep)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def read_sentences(path: Path, count: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0].strip() for line in lines if line.strip()][:count]


# ---- the yardstick: the bare encoder offline ------------------------------------------------------


def engine_rate(model_dir: Path, adapter: str, sentences: list[str], precision: str, batch: int, threads: int) -> float:
    """Sentences/s of the engine alone (no HTTP, tokenization not timed) at ``batch`` rows per batch."""
    from service.engine import Engine
    from service.repository import ModelRepository

    torch.set_num_threads(threads)
    repository = ModelRepository(model_dir, precision=precision)
    repository.scan()
    engine = Engine(repository)
    loaded = repository.acquire(adapter)
    rows = engine.tokenize(loaded, sentences[:320])
    batches = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    engine.run_batch(batches[0])
    began = time.perf_counter()
    for chunk in batches:
        engine.run_batch(chunk)
    return len(rows) / (time.perf_counter() - began)


def mean_batch_size(metrics_before: str, metrics_after: str) -> float:
    """Rows per engine batch between two /metrics scrapes."""
    rows, count = (
        metric_sum(metrics_after, name) - metric_sum(metrics_before, name)
        for name in ("cogalora_batch_size_sum", "cogalora_batch_size_count")
    )
    return rows / count if count else float("nan")


#: The service's own view of a request (histograms of /metrics): the whole request, then its parts in
#: the order it meets them, then the engine's batches; label -> metric. Their means between two scrapes
#: say where the latency of a load went.
SERVER_SIDE = {
    "request_ms": "cogalora_request_duration_seconds",
    "tokenize_ms": "cogalora_tokenize_duration_seconds",
    "queue_ms": "cogalora_queue_duration_seconds",
    "engine_ms": "cogalora_inference_duration_seconds",
    "batch_ms": "cogalora_batch_duration_seconds",
}


def server_side(metrics_before: str, metrics_after: str) -> dict[str, float]:
    """Means between two /metrics scrapes: a request as the server saw it (whole, tokenizing, queued for a
    batch, in the engine), the wall time of an engine batch (ms) and its rows."""
    means = {}
    for label, name in SERVER_SIDE.items():
        total, count = (
            metric_sum(metrics_after, name + part) - metric_sum(metrics_before, name + part)
            for part in ("_sum", "_count")
        )
        means[label] = 1000 * total / count if count else float("nan")
    means["batch_size"] = mean_batch_size(metrics_before, metrics_after)
    return means


# ---- load generators ----------------------------------------------------------------------------


def wrk_script(bodies: list[str], path: Path) -> None:
    """A wrk Lua script POSTing the JSON bodies in turn."""
    quoted = ",\n".join(f"[==[{body}]==]" for body in bodies)
    path.write_text(
        f"local bodies = {{\n{quoted}\n}}\nlocal i = 0\n"
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        "request = function()\n  i = i % #bodies + 1\n"
        '  return wrk.format(nil, "/classify", nil, bodies[i])\nend\n',
        encoding="utf-8",
    )


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_wrk(output: str) -> dict:
    """Requests/s, latency percentiles (s) and non-2xx count from ``wrk --latency`` output."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if rate is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    latency = {
        f"p{q}": float(value) * _UNITS[unit]
        for q, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    }
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors:.*", output)
    return {
        "requests_per_s": float(rate.group(1)),
        "latency_s": latency,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(0) if errors else None,
    }


def run_wrk(url: str, script: Path, concurrency: int, duration: float) -> dict:
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{int(duration)}s", "--latency", "-s", str(script), url]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=True)
    return parse_wrk(completed.stdout)


def run_httpx(url: str, adapter: str, texts_file: Path, duration: float, **mode: float) -> dict:
    """The project's load tester in its own process (closed loop: concurrency=N; open loop: rate=R)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report_file:
        command = [sys.executable, "-m", "benchmarks.loadtest", "--url", url, "--adapter-mix", adapter]
        command += ["--texts", str(texts_file), "--duration", str(duration), "--no-progress"]
        command += ["--output", report_file.name]
        for name, value in mode.items():
            command += [f"--{name}", str(value)]
        subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=duration + 120)
        report = json.loads(Path(report_file.name).read_text())
    return {
        "requests_per_s": report["throughput"]["requests_per_s"],
        "latency_s": {key: report["latency_s"][key] for key in ("p50", "p99")},
        "errors": report["requests"]["errors"],
        "rejected": report["requests"]["rejected"],
    }


def warm(url: str, body: str) -> None:
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        for _ in range(20):
            client.post(f"{url}/classify", content=body, headers={"Content-Type": "application/json"})


# ---- the study ------------------------------------------------------------------------------------


def measure_server(server: ServiceProcess, args, bodies, script, texts_file) -> dict:
    server.wait_ready()
    warm(server.url, bodies[0])
    results = {}
    if "wrk" in args.clients:
        before = server.metrics_text() if server.name == "service" else ""
        results["wrk"] = run_wrk(server.url, script, args.concurrency, args.duration)
        if server.name == "service":
            results["wrk"]["mean_batch_size"] = mean_batch_size(before, server.metrics_text())
    if "httpx" in args.clients:
        results["httpx"] = run_httpx(server.url, args.adapter, texts_file, args.duration, concurrency=args.concurrency)
    return results


def sweep(server: ServiceProcess, args, bodies: list[str], texts_file: Path, maximum: float) -> dict:
    client = args.sweep_client
    seconds = min(args.duration, 10.0)
    idle = None
    before = server.metrics_text()
    if client == "lean":
        lone = asyncio.run(run_sequential(server.url, "/classify", bodies, seconds)).as_dict()
    else:
        lone = run_httpx(server.url, args.adapter, texts_file, seconds, concurrency=1)
    lone_inside = server_side(before, server.metrics_text())
    print(f"  lone requests, back to back: {describe_server_side(lone_inside)}", flush=True)
    if client == "lean":
        idle = asyncio.run(run_sequential(server.url, "/classify", bodies, seconds, IDLE_PAUSE_S)).as_dict()
    points = []
    for fraction in [float(f) for f in args.sweep_fractions.split(",")]:
        rate = max(fraction * maximum, 0.5)
        before = server.metrics_text()
        if client == "lean":
            measured = asyncio.run(run_open_loop(server.url, "/classify", bodies, rate, args.duration)).as_dict()
        else:
            measured = run_httpx(server.url, args.adapter, texts_file, args.duration, rate=round(rate, 2))
        inside = server_side(before, server.metrics_text())
        points.append({"fraction": fraction, "offered_per_s": rate, **measured, "server_side": inside})
        print(
            f"  offered {rate:6.1f} req/s ({fraction:.2f} of max), answered {measured['requests_per_s']:6.1f}/s: "
            f"p50 {1000 * measured['latency_s']['p50']:.1f} ms, p99 {1000 * measured['latency_s']['p99']:.1f} ms; "
            f"{describe_server_side(inside)}",
            flush=True,
        )
    return {
        "client": client,
        "lone_request_latency_s": lone["latency_s"]["p50"],
        "idle_request_latency_s": None if idle is None else idle["latency_s"]["p50"],
        "lone_server_side": lone_inside,
        "maximum_per_s": maximum,
        "points": points,
    }


def describe_server_side(means: dict[str, float]) -> str:
    """One line of :func:`server_side`'s means."""
    return (
        f"server side, mean per request: {means['request_ms']:.1f} ms = tokenizing {means['tokenize_ms']:.2f} + "
        f"queued {means['queue_ms']:.1f} + engine {means['engine_ms']:.1f} (+ HTTP and hand-offs); "
        f"batches of {means['batch_size']:.2f} rows, {means['batch_ms']:.1f} ms each"
    )


#: The parts of a request the second panel of the sweep's plot stacks: ``server_side`` key -> label.
STACKED_PARTS = {"tokenize_ms": "tokenizing", "queue_ms": "queued for an engine", "engine_ms": "in the engine"}


def plot_sweep(result: dict, path: Path, title: str):
    """p50 and p99 against the load answered; below, where the mean request's time went at each load (the
    server's own histograms), when the sweep recorded it. Saved to ``path``; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    split = all("server_side" in p for p in points) and "lone_server_side" in result
    if split:
        figure, (axis, parts) = plt.subplots(2, 1, figsize=(7, 7.2), height_ratios=(3, 2))
    else:
        figure, axis = plt.subplots(figsize=(7, 4.2))
    answered = [p["requests_per_s"] for p in points]
    for key, style in (("p50", "o-"), ("p99", "s-")):
        axis.plot(answered, [1000 * p["latency_s"][key] for p in points], style, label=f"{key} latency")
    lone = 1000 * result["lone_request_latency_s"]
    axis.axhline(lone, color="grey", linestyle=":", label=f"lone request, back to back ({lone:.0f} ms)")
    axis.axhline(3 * lone, color="grey", linestyle="--", label="3x lone request")
    idle = result.get("idle_request_latency_s")
    if idle:
        axis.axhline(
            1000 * idle, color="tab:green", linestyle=":", label=f"request on an idle server ({1000 * idle:.0f} ms)"
        )
    axis.axvline(result["maximum_per_s"], color="black", linestyle="-.", label="max throughput (wrk, closed loop)")
    axis.set_xlabel(f"load answered (requests/s; Poisson arrivals, client {result.get('client', 'httpx')})")
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    if split:
        _plot_server_side(parts, [result["lone_server_side"], *(p["server_side"] for p in points)], points)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return figure


def _plot_server_side(axis, means: list[dict[str, float]], points: list[dict]) -> None:
    """Stacked bars: the mean request in the server, split into its parts, for the lone request and each load."""
    names = ["lone", *(f"{p['fraction']:g}" for p in points)]
    bottom = [0.0] * len(means)
    for key, label in STACKED_PARTS.items():
        heights = [m[key] for m in means]
        axis.bar(names, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    rest = [max(0.0, m["request_ms"] - b) for m, b in zip(means, bottom, strict=True)]
    axis.bar(names, rest, bottom=bottom, label="HTTP, hand-offs", color="lightgrey")
    # The bar at the maximum (queues without bound) would flatten the others: it is cut, its height written.
    totals = sorted(m["request_ms"] for m in means)
    top = 1.25 * totals[-2] if len(totals) > 1 and totals[-1] > 2 * totals[-2] else 1.1 * totals[-1]
    axis.set_ylim(0, top)
    for index, m in enumerate(means):
        cut = m["request_ms"] > top
        label = f"{m['batch_size']:.1f} rows" + (f", {m['request_ms']:.0f} ms (cut)" if cut else "")
        axis.annotate(label, (index, min(m["request_ms"], top * 0.93)), ha="center", va="bottom", fontsize=7)
    axis.set_xlabel("load (fraction of the maximum; bar label: mean rows per engine batch)")
    axis.set_ylabel("mean request in the server (ms)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"SKIPPED: sentence data not found at {args.data} (pass --data PATH)", file=sys.stderr)
        return 0
    args.clients = set(args.clients.split(","))
    if "wrk" in args.clients and shutil.which("wrk") is None:
        print("note: wrk is not installed (apt-get install wrk); measuring with httpx only", file=sys.stderr)
        args.clients.discard("wrk")
    from cogalora.precision import resolve_precision
    from service.engine_core import engine_threads
    from service.settings import Settings

    sentences = read_sentences(args.data, args.sentences)
    bodies = [json.dumps({"inputs": text, "adapter": args.adapter}) for text in sentences]
    report: dict = {"concurrency": args.concurrency, "duration_s": args.duration, "sentences": len(sentences)}
    report["baselines_batch32_per_s"] = baseline_rates(args.model_dir, args.adapter, sentences)
    print(f"baselines, batch 32, sentences/s: {report['baselines_batch32_per_s']}", flush=True)
    servers = []
    with tempfile.TemporaryDirectory() as scratch:
        script, texts_file = Path(scratch) / "classify.lua", Path(scratch) / "texts.txt"
        wrk_script(bodies, script)
        texts_file.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        configs = [
            (dtype, mode, threads, processes)
            for dtype in args.dtypes.split(",")
            for mode in args.modes.split(",")
            for threads in args.torch_threads.split(",")
            for processes in (args.engine_processes.split(",") if mode == "process" else ["0"])
        ]
        for dtype, mode, threads, processes in configs:
            precision = resolve_precision(dtype).name
            label = f"service {precision}" + (", one process" if mode == "inprocess" else "")
            label += f", torch_threads {threads}" if threads != "0" else ""
            label += f", {processes} engine process{'es' if processes != '1' else ''}" if processes != "0" else ""
            env = {
                "COGALORA_DTYPE": dtype,
                "COGALORA_TORCH_THREADS": threads,
                "COGALORA_ENGINE_PROCESS": str(mode == "process").lower(),
                "COGALORA_ENGINE_PROCESSES": processes,
            }
            server = ServiceProcess(args.model_dir, Path(scratch) / "service.log", extra_env=env)
            try:
                print(f"{label}: measuring", flush=True)
                measured = {"server": label, **measure_server(server, args, bodies, script, texts_file)}
                if args.sweep and "sweep" not in report:
                    maximum = measured.get("wrk", measured.get("httpx"))["requests_per_s"]
                    report["sweep"] = {"server": label, **sweep(server, args, bodies, texts_file, maximum)}
            finally:
                server.stop()
            batch = measured.get("wrk", {}).get("mean_batch_size")
            if batch and batch == batch:  # not NaN
                threads_used = engine_threads(Settings(torch_threads=int(threads)).resolved_torch_threads())
                measured["engine_offline_per_s"] = engine_rate(
                    args.model_dir, args.adapter, sentences, precision, max(1, round(batch)), threads_used
                )
            servers.append(measured)
        if not args.no_naive:
            naive = ServiceProcess(
                args.model_dir / args.adapter, Path(scratch) / "naive.log", command=NAIVE_COMMAND, name="naive"
            )
            try:
                print("naive FastAPI + PEFT server: measuring", flush=True)
                servers.append(
                    {
                        "server": "naive FastAPI + PEFT (float32)",
                        **measure_server(naive, args, bodies, script, texts_file),
                    }
                )
            finally:
                naive.stop()
    report["servers"] = servers
    print_report(report)
    if args.plot and "sweep" in report:
        plot_sweep(report["sweep"], args.plot, f"{report['sweep']['server']}: latency under open-loop load")
        print(f"wrote {args.plot}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    return 0


def print_report(report: dict) -> None:
    baselines = report["baselines_batch32_per_s"]
    bare32 = baselines["torch-float32"]
    ort_int8 = baselines.get("onnxruntime-int8")
    naive = next((s for s in report["servers"] if s["server"].startswith("naive")), None)
    print(f"\n{report['concurrency']} closed-loop clients, one sentence per request, {report['duration_s']:.0f} s each")
    columns = ["server", "client", "req/s", "p50 / p99 ms", "vs naive", "vs torch fp32 bs32", "vs ORT int8 bs32"]
    print("| " + " | ".join([*columns, "vs engine offline"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for server in report["servers"]:
        for client in ("wrk", "httpx"):
            if client not in server:
                continue
            result = server[client]
            rate = result["requests_per_s"]
            versus_naive = f"{rate / naive[client]['requests_per_s']:.2f}x" if naive and client in naive else "-"
            versus_ort = f"{rate / ort_int8:.2f}x" if ort_int8 else "-"
            offline = server.get("engine_offline_per_s")
            versus_engine = (
                f"{rate / offline:.2f}x (batch {result['mean_batch_size']:.1f})" if offline and client == "wrk" else "-"
            )
            p50, p99 = (1000 * result["latency_s"].get(key, float("nan")) for key in ("p50", "p99"))
            bad = f", {result['non_2xx']} non-2xx" if result.get("non_2xx") else ""
            print(
                f"| {server['server']}{bad} | {client} | {rate:.1f} | {p50:.0f} / {p99:.0f} | {versus_naive} | "
                f"{rate / bare32:.2f}x | {versus_ort} | {versus_engine} |"
            )
    for name, rate in baselines.items():
        print(
            f"| {name}, offline | - | {rate:.1f} | - | - | {rate / bare32:.2f}x | "
            + (f"{rate / ort_int8:.2f}x | - |" if ort_int8 else "- | - |")
        )
    if "sweep" in report:
        result = report["sweep"]
        lone = result["lone_request_latency_s"]
        half = min(result["points"], key=lambda p: abs(p["fraction"] - 0.5))
        print(
            f"latency under load ({result.get('client', 'httpx')}): lone request {1000 * lone:.0f} ms; offered "
            f"{half['offered_per_s']:.0f} req/s ({half['fraction']:.2f} of max), answered "
            f"{half['requests_per_s']:.0f}/s: p50 {1000 * half['latency_s']['p50']:.0f} ms, "
            f"p99 {1000 * half['latency_s']['p99']:.0f} ms = {half['latency_s']['p99'] / lone:.1f}x the lone request"
        )
        idle = result.get("idle_request_latency_s")
        if idle:
            print(
                f"a request on an idle server ({1000 * IDLE_PAUSE_S:.0f} ms after the last answer): "
                f"{1000 * idle:.1f} ms; p99 at half the maximum = {half['latency_s']['p99'] / idle:.1f}x that"
            )


if __name__ == "__main__":
    raise SystemExit(main())
