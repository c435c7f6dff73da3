"""Many adapters through HTTP: one adapter's traffic against the same traffic spread over many.

A temporary model directory gets ``--folders`` copies of one committed adapter; one service serves
it. ``wrk`` (``--concurrency`` clients, one full SST-2 sentence per request) sends every request to
one adapter, then spreads the same sentences uniformly over ``--used`` adapters (each loaded into
every engine process before any measurement, as in a steady state), in ``--rounds`` alternating
rounds, so that a machine whose speed drifts over a minute weighs on both alike. Both hit the same
server, so the ratio of their request rates is what mixing adapters costs; it also reports how long
``/ready`` took with that many folders.

    python -m benchmarks.many_adapters --folders 500 --used 200 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks.processes import ServiceProcess
from benchmarks.serving import DEFAULT_DATA, ROOT, read_sentences, run_wrk, warm, wrk_script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.many_adapters", description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT / "models" / "sst2", help="adapter folder to copy")
    parser.add_argument("--folders", type=int, default=500, help="copies in the model directory (default: 500)")
    parser.add_argument("--used", type=int, default=200, help="adapters receiving traffic (default: 200)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TSV, sentences in the first column")
    parser.add_argument("--sentences", type=int, default=1000, help="distinct sentences sent in turn")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections (default: 32)")
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of traffic for each of the two (default: 20)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds the duration is cut into (default: 4)"
    )
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not 1 <= args.used <= args.folders:
        parser.error("--used must lie between 1 and --folders")
    if args.rounds < 1 or args.duration / args.rounds < 2:
        parser.error("--rounds must be at least 1, with at least 2 s of --duration each")
    return args


def name_of(index: int) -> str:
    return f"adapter-{index:04d}"


async def load_everywhere(url: str, bodies: list[str]) -> None:
    """Load each adapter into every engine process, as in a steady state: requests for one adapter sent
    at once go to different processes (each goes to the one holding the fewest rows)."""
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=60.0, trust_env=False) as client:
        processes = max(1, (await client.get(f"{url}/info")).json().get("engine_processes", 1))
        for body in bodies:
            await asyncio.gather(
                *(client.post(f"{url}/classify", content=body, headers=headers) for _ in range(processes))
            )


def merged(measured: list[dict]) -> dict:
    """Rounds of one ``wrk`` measurement as one: the mean request rate (rounds are equally long), the
    non-2xx answers summed."""
    return {
        "requests_per_s": sum(m["requests_per_s"] for m in measured) / len(measured),
        "non_2xx": sum(m["non_2xx"] for m in measured),
        "rounds": measured,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"SKIPPED: sentence data not found at {args.data} (pass --data PATH)", file=sys.stderr)
        return 0
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    sentences = read_sentences(args.data, args.sentences)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "models"
        for index in range(args.folders):
            shutil.copytree(args.source, model_dir / name_of(index))
        env = {
            "COGALORA_MAX_LOADED_ADAPTERS": str(args.used),
            "COGALORA_METRICS_ADAPTER_LABELS": "top:20",
        }
        server = ServiceProcess(model_dir, Path(scratch) / "service.log", extra_env=env)
        try:
            started = time.monotonic()
            server.wait_ready()
            ready_s = time.monotonic() - started
            scripts = {}
            for label, used in (("one adapter", 1), (f"{args.used} adapters", args.used)):
                count = max(len(sentences), used)
                bodies = [
                    json.dumps({"inputs": sentences[i % len(sentences)], "adapter": name_of(i % used)})
                    for i in range(count)
                ]
                asyncio.run(load_everywhere(server.url, bodies[:used]))
                scripts[label] = Path(scratch) / f"classify-{used}.lua"
                wrk_script(bodies, scripts[label])
            warm(server.url, bodies[0])
            rounds: dict[str, list[dict]] = {label: [] for label in scripts}
            for _ in tqdm(range(args.rounds), desc="rounds", unit="round", file=sys.stderr):
                for label, script in scripts.items():
                    rounds[label].append(run_wrk(server.url, script, args.concurrency, args.duration / args.rounds))
            runs = {label: merged(measured) for label, measured in rounds.items()}
            for label, run in runs.items():
                print(f"{label}: {run['requests_per_s']:.1f} req/s", flush=True)
        finally:
            server.stop()
    one, many = runs["one adapter"], runs[f"{args.used} adapters"]
    per_round = [
        b["requests_per_s"] / a["requests_per_s"]
        for a, b in zip(rounds["one adapter"], rounds[f"{args.used} adapters"], strict=True)
    ]
    report = {
        "folders": args.folders,
        "used": args.used,
        "ready_s": round(ready_s, 1),
        "runs": runs,
        "ratio": many["requests_per_s"] / one["requests_per_s"],
        "round_ratios": per_round,
    }
    print(
        f"{args.folders} folders (/ready after {ready_s:.1f} s); {args.used} adapters at "
        f"{report['ratio']:.2f}x one adapter (rounds: {', '.join(f'{r:.2f}' for r in per_round)}); "
        f"non-2xx: {one['non_2xx']} and {many['non_2xx']}"
    )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
