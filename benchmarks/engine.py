"""Offline engine benchmark: sentences/s on the same batches of real SST-2 dev sentences, one process.

Variants, every one timed on identical pre-tokenized batches (tokenization is not timed; the engine
variants include building padded tensors and the per-row result dicts):

  (a) base      bare encoder + the adapter's head (plain AutoModelForSequenceClassification)
  (b) peft      PEFT LoRA, unmerged (peft.PeftModel.from_pretrained on the checkpoint)
  (c) engine    the serving engine with CoGaLoRA gates (length split on)
  (c') engine-1fwd  the same, one padded forward per batch (no length split)
  (d) engine-on the engine with every gate forced on
  (e) mixed     the engine on a batch alternating rows of two adapters

Rounds interleave the variants; each figure is the median over rounds, and each ratio is the
median of the per-round ratios to (a) on the same batches, which cancels slow drift in machine load
(``--statistic min`` reports each variant's best round instead, for a machine shared with other work).

    python -m benchmarks.engine --model-dir models --output runs/bench_engine.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
VARIANTS = {
    "base": "(a) bare encoder + head",
    "peft": "(b) PEFT LoRA unmerged",
    "engine": "(c) engine, CoGaLoRA gates",
    "engine-1fwd": "(c') engine, one padded forward",
    "engine-on": "(d) engine, all gates on",
    "mixed": "(e) engine, two adapters mixed",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models", help="checkpoint folders (default: models/)")
    parser.add_argument("--adapter", default="sst2", help="adapter timed in (a)-(d) (default: sst2)")
    parser.add_argument("--second-adapter", default="agnews", help="the other adapter of the mixed batch (e)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TSV with a 'sentence' column")
    parser.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated (default: 1,8,32,64)")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches per batch size (default: 4)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is reported (default: 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument(
        "--statistic",
        choices=["median", "min"],
        default="median",
        help="how rounds are combined: median (default), or min (best round; for a machine shared with other load)",
    )
    parser.add_argument("--no-tune-malloc", action="store_true", help="leave glibc malloc settings alone")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def read_sentences(path: Path, count: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    column = header.index("sentence") if "sentence" in header else 0
    sentences = [line.split("\t")[column].strip() for line in lines[1:] if line.strip()]
    if len(sentences) < count:
        raise SystemExit(f"{path} has {len(sentences)} sentences; the benchmark needs {count}")
    return sentences[:count]


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and process CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"SKIPPED: SST-2 dev data not found at {args.data} (pass --data PATH)", file=sys.stderr)
        return 0
    from peft import PeftModel

    from cogalora import load_base_model
    from service.engine import Engine
    from service.repository import ModelRepository
    from service.types import ClassifyRequest

    torch.set_num_threads(args.threads)
    repository = ModelRepository(args.model_dir)
    failures = repository.load_all()
    for name, reason in failures.items():
        print(f"note: skipped checkpoint {name}: {reason}", file=sys.stderr)
    for name in (args.adapter, args.second_adapter):
        if name not in repository.names():
            raise SystemExit(
                f"adapter {name!r} not found in {args.model_dir} (loaded: {repository.names()}); "
                "pass --model-dir/--adapter/--second-adapter"
            )
    tune = not args.no_tune_malloc
    engines = {
        "engine": Engine(repository, tune_malloc=tune),
        "engine-1fwd": Engine(repository, split_by_length=False, tune_malloc=tune),
        "engine-on": Engine(repository, force_gates="on", tune_malloc=tune),
    }
    engine = engines["engine"]
    adapter = repository.get(args.adapter)
    meta = adapter.meta
    checkpoint = args.model_dir / args.adapter
    base = load_base_model(meta.base_model, num_labels=len(meta.labels))
    with torch.no_grad():
        for path, (weight, bias) in _head(checkpoint).items():
            module = base.get_submodule(path)
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    peft = PeftModel.from_pretrained(load_base_model(meta.base_model, num_labels=len(meta.labels)), str(checkpoint))
    peft.eval()
    tokenizer = adapter.base.tokenizer

    sizes = [int(size) for size in args.batch_sizes.split(",")]
    sentences = read_sentences(args.data, max(sizes) * args.batches)
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "tune_malloc": tune,
        },
        "model_dir": str(args.model_dir),
        "adapter": args.adapter,
        "second_adapter": args.second_adapter,
        "data": str(args.data),
        "batches_per_size": args.batches,
        "rounds": args.rounds,
        "statistic": args.statistic,
        "results": [],
    }
    print(f"threads={torch.get_num_threads()} adapter={args.adapter} base={meta.base_model} data={args.data}")
    for size in sizes:
        batches = [sentences[i * size : (i + 1) * size] for i in range(args.batches)]
        encoded = [
            tokenizer(batch, padding=True, truncation=True, max_length=adapter.max_length, return_tensors="pt")
            for batch in batches
        ]
        rows = [engine.prepare(ClassifyRequest(texts=batch, adapter=args.adapter)) for batch in batches]
        # Rows alternate between the two adapters (across batches too, so batch size 1 mixes over time).
        names = (args.adapter, args.second_adapter)
        mixed = [
            [
                row
                for j, text in enumerate(batch)
                for row in engine.prepare(ClassifyRequest(texts=[text], adapter=names[(i * size + j) % 2]))
            ]
            for i, batch in enumerate(batches)
        ]

        def run_hf(model, encoded=encoded):
            with torch.inference_mode():
                for inputs in encoded:
                    model(**inputs)

        def run_engine(name, prepared):
            for batch_rows in prepared:
                engines[name].run_batch(batch_rows)

        runners = {
            "base": lambda: run_hf(base),
            "peft": lambda: run_hf(peft),
            "engine": lambda rows=rows: run_engine("engine", rows),
            "engine-1fwd": lambda rows=rows: run_engine("engine-1fwd", rows),
            "engine-on": lambda rows=rows: run_engine("engine-on", rows),
            "mixed": lambda mixed=mixed: run_engine("engine", mixed),
        }
        for runner in runners.values():  # warm-up
            runner()
        times: dict[str, list[float]] = {name: [] for name in runners}
        cpu_times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                wall, cpu = timed(runner)
                times[name].append(wall)
                cpu_times[name].append(cpu)
        outcome = [engine.run_batch(batch_rows) for batch_rows in rows]
        results = [r for run in outcome for r in run.results]
        active = statistics.fmean(r.active_adapters / max(r.total_adapters, 1) for r in results)
        padded = sum(s.padded_tokens for run in outcome for s in run.stats)
        real = sum(s.real_tokens for run in outcome for s in run.stats)
        hf_padded = sum(int(inputs["attention_mask"].numel()) for inputs in encoded)
        count = size * args.batches
        entry = {
            "batch_size": size,
            "sentences": count,
            "active_fraction": active,
            "real_tokens": real,
            "padded_tokens_engine": padded,
            "padded_tokens_hf": hf_padded,
            "variants": {},
        }
        for name, samples in times.items():
            if args.statistic == "min":
                # Best round of each variant: the least disturbed by other load on the machine.
                ratio = min(times["base"]) / min(samples)
                cpu_ratio = min(cpu_times["base"]) / min(cpu_times[name])
                wall, cpu = min(samples), min(cpu_times[name])
            else:
                ratio = statistics.median(b / t for b, t in zip(times["base"], samples, strict=True))
                cpu_ratio = statistics.median(b / t for b, t in zip(cpu_times["base"], cpu_times[name], strict=True))
                wall, cpu = statistics.median(samples), statistics.median(cpu_times[name])
            entry["variants"][name] = {
                "sentences_per_s": count / wall,
                "ratio_to_base": ratio,
                "sentences_per_cpu_s": count / cpu,
                "cpu_ratio_to_base": cpu_ratio,
                "seconds": samples,
                "cpu_seconds": cpu_times[name],
            }
        report["results"].append(entry)
        print(
            f"batch {size}: active adapters {active:.1%}, tokens real {real} / engine padded {padded} / "
            f"HF padded {hf_padded}",
            flush=True,
        )
    print_table(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


def _head(checkpoint: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from cogalora import read_adapter

    return read_adapter(checkpoint)[1].head


def _print_figures(report: dict, sizes: list[int], per_second: str, ratio: str, unit: str) -> None:
    print("| variant | " + " | ".join(f"batch {size}" for size in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, label in VARIANTS.items():
        cells = []
        for entry in report["results"]:
            figures = entry["variants"][name]
            cells.append(f"{figures[per_second]:.0f}/{unit} ({figures[ratio]:.2f}x)")
        print(f"| {label} | " + " | ".join(cells) + " |")


def print_table(report: dict) -> None:
    sizes = [entry["batch_size"] for entry in report["results"]]
    print()
    _print_figures(report, sizes, "sentences_per_s", "ratio_to_base", "s")
    print()
    print("Process CPU time instead of wall time (robust to other processes on the machine):")
    _print_figures(report, sizes, "sentences_per_cpu_s", "cpu_ratio_to_base", "cpu-s")
    print("| active adapters (c) | " + " | ".join(f"{e['active_fraction']:.0%}" for e in report["results"]) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
