"""What routing fidelity costs and shows, in one process, on real sentences through the serving engine.

``python -m benchmarks.fidelity [--shadow-fractions 0.05,1] [--rows 512]``:

- *cost*: engine throughput with each shadow fraction as a ratio to ``shadow_fraction`` 0 on the same
  batches, in CPU time of the engine thread and in wall time (the variants run each batch back to
  back, in rotating order; ratios of total times, and per round to show the spread);
- *agreement*: with every routed row shadowed, how often the routed label equals the dense (every
  gate on) label, and the mean and p99 of ``|score_routed - score_dense|``, on the data;
- *drift*: the ``cogalora_routing_drift`` value after ``--rows`` rows of the data, and after as many
  rows of ``--other-data`` (another domain) sent to the same adapter.

Tokenization is not timed. Results as JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.engine import DEFAULT_DATA, ROOT, machine, read_sentences
from cogalora.precision import PRECISION_CHOICES

DEFAULT_OTHER_DATA = ROOT.parent / "shared" / "data" / "agnews" / "dev.tsv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models", help="checkpoint folders (default: models/)")
    parser.add_argument("--adapter", default="sst2", help="adapter measured (default: sst2)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="its dev data (TSV, text in column 1)")
    parser.add_argument("--other-data", type=Path, default=DEFAULT_OTHER_DATA, help="another domain, for drift")
    parser.add_argument("--rows", type=int, default=512, help="rows per variant and round (default: 512)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per engine batch (default: 32)")
    parser.add_argument("--shadow-fractions", default="0.05,1", help="fractions timed against 0 (default: 0.05,1)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    parser.add_argument("--dtype", default="float32", choices=PRECISION_CHOICES, help="precision")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.set_defaults(statistic="ratio of total CPU / wall times, variants back to back per batch")  # for machine()
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from service.engine import Engine
    from service.fidelity import DriftWindow
    from service.repository import ModelRepository

    fractions = [float(part) for part in args.shadow_fractions.split(",") if part.strip()]
    repository = ModelRepository(args.model_dir, precision=args.dtype)
    failures = repository.scan()
    if args.adapter in failures:
        raise SystemExit(f"adapter {args.adapter!r} cannot be served: {failures[args.adapter]}")
    adapter = repository.acquire(args.adapter)
    engines = {fraction: Engine(repository, shadow_fraction=fraction) for fraction in [0.0, *fractions]}
    base = engines[0.0]

    def batches(path: Path) -> list[list]:
        rows = base.tokenize(adapter, read_sentences(path, args.rows))
        return [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]

    dev = batches(args.data)
    # Batch by batch, the variants back to back (in rotating order), so that load from other
    # processes falls on every variant alike; a round is one pass over the batches.
    names = {fraction: f"shadow {fraction:g}" for fraction in engines}
    order = list(engines)
    shadow_rows = dict.fromkeys(engines, 0)
    for engine in engines.values():  # warm-up
        engine.run_batch(dev[0])
    # Wall time, and the CPU time of this thread (torch runs its one intra-op thread here): on a
    # machine shared with other work, CPU time is the steadier measure of what the shadow rows cost.
    wall: list[dict[float, float]] = []
    cpu: list[dict[float, float]] = []
    for _ in range(args.rounds):
        wall.append(dict.fromkeys(engines, 0.0))
        cpu.append(dict.fromkeys(engines, 0.0))
        for index, batch in enumerate(dev):
            for fraction in order[index % len(order) :] + order[: index % len(order)]:
                began, began_cpu = time.perf_counter(), time.thread_time()
                outcome = engines[fraction].run_batch(batch)
                cpu[-1][fraction] += time.thread_time() - began_cpu
                wall[-1][fraction] += time.perf_counter() - began
                shadow_rows[fraction] += sum(len(stats.shadow) for stats in outcome.stats)

    def ratio(rounds: list[dict[float, float]], fraction: float) -> float:
        return sum(r[0.0] for r in rounds) / sum(r[fraction] for r in rounds)

    cost = {
        names[fraction]: {
            "throughput_ratio_cpu": ratio(cpu, fraction),
            "per_round_ratios_cpu": [round(r[0.0] / r[fraction], 4) for r in cpu],
            "throughput_ratio_wall": ratio(wall, fraction),
            "per_round_ratios_wall": [round(r[0.0] / r[fraction], 4) for r in wall],
            "shadow_rows_per_row": shadow_rows[fraction] / (args.rounds * args.rows),
            "rows_per_cpu_second": args.rounds * args.rows / sum(r[fraction] for r in cpu),
        }
        for fraction in engines
    }

    checker = Engine(repository, shadow_fraction=1.0)
    outcomes = [o for batch in dev for stats in checker.run_batch(batch).stats for o in stats.shadow]
    differences = sorted(o.score_difference for o in outcomes)
    agreement = {
        "rows": len(outcomes),
        "agreement": sum(o.agree for o in outcomes) / len(outcomes),
        "mean_score_difference": statistics.fmean(differences),
        "p99_score_difference": differences[min(len(differences) - 1, int(0.99 * len(differences)))],
    }

    def drift(groups: list[list]) -> float | None:
        window, value = DriftWindow(args.rows), None
        for batch in groups:
            for sample in (s for stats in base.run_batch(batch).stats for s in stats.routing):
                value = window.add(sample)
        return value

    report = {
        "machine": machine(args),
        "adapter": args.adapter,
        "data": str(args.data),
        "rows": args.rows,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "cost": cost,
        "dense_agreement": agreement,
        "drift": {"dev": drift(dev), "other_domain": drift(batches(args.other_data)), "other": str(args.other_data)},
    }
    repository.release(adapter)
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
