"""Does a precision keep the served models' answers? Accuracy and gate decisions per precision.

Runs every labelled dev set through the serving engine (the served path, batches of 32) once per
dtype, and compares each dtype with float32: accuracy, labels that change, gate decisions that
flip (out of every (row, site) pair), and the largest probability difference.

    python -m benchmarks.precision [--dtypes float32,int8,bfloat16] [--output runs/precision.json]

The budget for adopting a precision as the default: accuracy within 0.3 points of float32 on every
set, and gate decisions differing on < 1 % of (row, site) pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from service.results import describe

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
#: (adapter, dev set) pairs: the committed models on the labelled dev files they were chosen on.
DEFAULT_SETS = (
    ("sst2", DATA / "sst2-sentences" / "dev.tsv"),
    ("sst2", DATA / "sst2" / "dev.tsv"),
    ("sst2-radlora", DATA / "sst2-sentences" / "dev.tsv"),
    ("sst2-lora", DATA / "sst2-sentences" / "dev.tsv"),
    ("agnews", DATA / "agnews" / "dev.tsv"),
    ("agnews-lora", DATA / "agnews" / "dev.tsv"),
)
ACCURACY_BUDGET_POINTS = 0.3
GATE_FLIP_BUDGET = 0.01


@dataclass
class Outcome:
    labels: list[str]
    gates: list[list[bool]]
    scores: list[dict[str, float]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models", help="checkpoint folders (default: models/)")
    parser.add_argument(
        "--dtypes", default="float32,int8,bfloat16", help="comma-separated precisions; the first is the reference"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="rows per engine batch (default: 32)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many rows per set")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def run_set(engine, adapter_name: str, texts: list[str], batch_size: int, label: str) -> Outcome:
    adapter = engine.repository.acquire(adapter_name)
    try:
        rows = engine.tokenize(adapter, texts, truncate=True)
        outcome = Outcome([], [], [])
        for start in tqdm(range(0, len(rows), batch_size), desc=label, unit="batch", leave=False, disable=None):
            chunk = rows[start : start + batch_size]
            for result in map(describe, chunk, engine.run_batch(chunk).results):
                outcome.labels.append(result.label)
                modules = set(result.active_modules)
                outcome.gates.append([name in modules for name in adapter.encoder.site_names])
                outcome.scores.append({item.label: item.score for item in result.scores})
        return outcome
    finally:
        engine.repository.release(adapter)


def compare(reference: Outcome, other: Outcome, gold: list[str]) -> dict:
    rows = len(gold)
    pairs = sum(len(gates) for gates in reference.gates)
    flips = sum(
        a != b for ref, oth in zip(reference.gates, other.gates, strict=True) for a, b in zip(ref, oth, strict=True)
    )
    return {
        "accuracy": sum(label == truth for label, truth in zip(other.labels, gold, strict=True)) / rows,
        "label_changes": sum(a != b for a, b in zip(reference.labels, other.labels, strict=True)),
        "gate_flip_fraction": flips / pairs if pairs else 0.0,
        "gate_flips": flips,
        "max_score_difference": max(
            abs(ref[label] - oth[label])
            for ref, oth in zip(reference.scores, other.scores, strict=True)
            for label in ref
        ),
        "active_fraction": sum(map(sum, other.gates)) / pairs if pairs else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cogalora import read_meta
    from service.engine import Engine
    from service.repository import ModelRepository
    from training.data import read_examples

    sets = [(adapter, path) for adapter, path in DEFAULT_SETS if path.is_file() and (args.model_dir / adapter).is_dir()]
    if not sets:
        print(f"SKIPPED: no dev data under {DATA}", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    examples = {}
    for adapter_name, path in sets:
        loaded = read_examples(path, limit=args.limit)
        labels = read_meta(args.model_dir / adapter_name).labels
        gold = [labels[int(e.label)] if e.label.isdigit() else e.label for e in loaded]
        examples[(adapter_name, path)] = ([e.text for e in loaded], gold)
    outcomes: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for dtype in dtypes:
        repository = ModelRepository(args.model_dir, precision=dtype)
        repository.scan()
        engine = Engine(repository, tune_malloc=False)
        began = time.perf_counter()
        outcomes[dtype] = {
            key: run_set(engine, key[0], texts, args.batch_size, f"{dtype} {key[0]} {key[1].parent.name}")
            for key, (texts, _) in examples.items()
        }
        seconds[dtype] = time.perf_counter() - began
    reference = dtypes[0]
    report = {"reference": reference, "threads": args.threads, "sets": []}
    print(f"\n| set (adapter) | dtype | accuracy | vs {reference} | labels changed | gate flips | active |")
    print("|---|---|---|---|---|---|---|")
    for key, (_, gold) in examples.items():
        entry = {"adapter": key[0], "data": str(key[1].relative_to(DATA)), "rows": len(gold), "dtypes": {}}
        base_accuracy = None
        for dtype in dtypes:
            stats = compare(outcomes[reference][key], outcomes[dtype][key], gold)
            base_accuracy = stats["accuracy"] if base_accuracy is None else base_accuracy
            stats["accuracy_delta_points"] = 100 * (stats["accuracy"] - base_accuracy)
            stats["within_budget"] = (
                abs(stats["accuracy_delta_points"]) <= ACCURACY_BUDGET_POINTS
                and stats["gate_flip_fraction"] < GATE_FLIP_BUDGET
            )
            entry["dtypes"][dtype] = stats
            print(
                f"| {entry['data']} ({key[0]}) | {dtype} | {100 * stats['accuracy']:.2f} % | "
                f"{stats['accuracy_delta_points']:+.2f} | {stats['label_changes']} / {len(gold)} | "
                f"{100 * stats['gate_flip_fraction']:.2f} % ({stats['gate_flips']}) | "
                f"{100 * stats['active_fraction']:.1f} % |"
            )
        report["sets"].append(entry)
    report["seconds"] = seconds
    verdicts = {d: all(e["dtypes"][d]["within_budget"] for e in report["sets"]) for d in dtypes[1:]}
    report["within_budget"] = verdicts
    for dtype, ok in verdicts.items():
        print(
            f"{dtype}: {'within' if ok else 'OUTSIDE'} the budget (±{ACCURACY_BUDGET_POINTS} points, <1 % gate flips)"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
