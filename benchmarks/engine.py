"""Offline engine benchmarks in one process, on identical batches of real full SST-2 sentences.

Two studies (tokenization is never timed; engine variants include building padded tensors and the
per-row results):

``python -m benchmarks.engine [--dtype float32] [--batch-sizes 1,8,32]``: variants as ratios to
the bare encoder on the same batches and padding.

  (a) bare          Hugging Face AutoModelForSequenceClassification + the adapter's head
  (b) peft          PEFT LoRA, unmerged (peft.PeftModel.from_pretrained on the checkpoint)
  (c) engine        the serving engine, CoGaLoRA gates, one forward per batch (padded as (a) in
                    float dtypes; in int8 its encoder layers run the real tokens only, packed)
  (c') engine-split the engine as it serves: length chunks in float dtypes (its own, smaller
                    padding); in int8 the same as (c), a packed forward has no padding to cut
  (d) engine-on     every gate forced on, one forward
  (e) mixed         two adapters alternating rows, one forward
  (f) torch-steps   int8 only: (c') with quantizing and dequantizing as torch operations instead of
                    the compiled C functions (cogalora.int8_kernels; the same bits), where those were
                    built

``python -m benchmarks.engine --adapters 1,10,100,1000 [--batch-sizes 8,32]``: N copies of one
adapter (hard links in a temporary model repository, all loaded), traffic spread uniformly so a
batch holds as many different adapters as it can; throughput as a ratio to one adapter on the
same sentences, resident memory, adapter storage and load time per adapter.

Rounds interleave the variants; each ratio is the median of per-round ratios (``--statistic min``:
each variant's best round, for a machine shared with other work).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cogalora.precision import PRECISION_CHOICES, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sst2-sentences" / "dev.tsv"
VARIANTS = {
    "bare": "(a) bare encoder + head",
    "peft": "(b) PEFT LoRA unmerged",
    "engine": "(c) engine, CoGaLoRA gates",
    "engine-split": "(c') engine as served (length chunks or packed)",
    "engine-on": "(d) engine, all gates on",
    "mixed": "(e) engine, two adapters mixed",
    "torch-steps": "(f) (c') with int8 steps as torch operations",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models", help="checkpoint folders (default: models/)")
    parser.add_argument("--adapter", default="sst2", help="adapter timed (default: sst2)")
    parser.add_argument("--second-adapter", default="agnews", help="the other adapter of the mixed batch (e)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TSV with the sentences in its first column")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default: 1,8,32; with --adapters 8,32)")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches per batch size (default: 4)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=PRECISION_CHOICES,
        help="the engine's precision; the bare encoder and PEFT run in its activation dtype (float32 for int8)",
    )
    parser.add_argument("--adapters", default=None, help="many-adapter study: comma-separated adapter counts")
    parser.add_argument(
        "--statistic", choices=["median", "min"], default="median", help="how rounds are combined (default: median)"
    )
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def add_timing_arguments(parser: argparse.ArgumentParser, batch_sizes: str) -> None:
    """The options every single-process timing benchmark shares (data, sizes, rounds, threads, output)."""
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TSV with the sentences in its first column")
    parser.add_argument("--batch-sizes", default=batch_sizes, help=f"comma-separated (default: {batch_sizes})")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches per batch size (default: 4)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: 1)")
    parser.add_argument(
        "--statistic", choices=["median", "min"], default="median", help="how rounds are combined (default: median)"
    )
    parser.add_argument("--output", type=Path, help="write the results as JSON here")


def read_sentences(path: Path, count: int) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    sentences = [line.split("\t")[0].strip() for line in lines[1:] if line.strip()]
    if len(sentences) < count:
        raise SystemExit(f"{path} has {len(sentences)} sentences; the benchmark needs {count}")
    return sentences[:count]


def resident_mb() -> float:
    """Resident set size of this process (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def interleaved(runners: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds of each runner per round, runners interleaved within a round (after one warm-up)."""
    for runner in runners.values():
        runner()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            began = time.perf_counter()
            runner()
            times[name].append(time.perf_counter() - began)
    return times


def ratios(times: dict[str, list[float]], baseline: str, statistic: str) -> dict[str, float]:
    """Throughput of each runner relative to ``baseline`` (higher is faster)."""
    if statistic == "min":
        return {name: min(times[baseline]) / min(samples) for name, samples in times.items()}
    return {
        name: statistics.median(b / t for b, t in zip(times[baseline], samples, strict=True))
        for name, samples in times.items()
    }


def machine(args: argparse.Namespace) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "statistic": args.statistic,
        "rounds": args.rounds,
    }


# ---- variants against the bare encoder -------------------------------------------------------------


def variants(args: argparse.Namespace, sizes: list[int]) -> dict:
    from peft import PeftModel

    from cogalora import int8_kernels, load_base_model, read_adapter
    from service.engine import Engine
    from service.repository import ModelRepository

    precision = resolve_precision(args.dtype)
    dtype = precision.activations
    repository = ModelRepository(args.model_dir, precision=precision)
    repository.scan()
    for name in (args.adapter, args.second_adapter):
        if name not in repository.names():
            raise SystemExit(f"adapter {name!r} not in {args.model_dir} (found {repository.names()})")
    one_forward = Engine(repository, split_by_length=False)
    engines = {
        "engine": one_forward,
        "engine-split": Engine(repository),
        "engine-on": Engine(repository, split_by_length=False, force_gates="on"),
        "mixed": one_forward,
    }
    first, second = repository.acquire(args.adapter), repository.acquire(args.second_adapter)
    meta, weights = read_adapter(args.model_dir / args.adapter)
    bare = load_base_model(meta.base_model, num_labels=len(meta.labels))
    with torch.no_grad():
        for path, (weight, bias) in weights.head.items():
            bare.get_submodule(path).weight.copy_(weight)
            bare.get_submodule(path).bias.copy_(bias)
    bare.to(dtype)
    peft = PeftModel.from_pretrained(
        load_base_model(meta.base_model, num_labels=len(meta.labels)), str(args.model_dir / args.adapter)
    )
    peft.eval().to(dtype)
    tokenizer = first.encoder.tokenizer
    sentences = read_sentences(args.data, max(sizes) * args.batches)
    report = {"study": "variants", "machine": machine(args), "adapter": args.adapter, "results": []}
    for size in sizes:
        batches = [sentences[i * size : (i + 1) * size] for i in range(args.batches)]
        encoded = [
            tokenizer(batch, padding=True, truncation=True, max_length=first.max_length, return_tensors="pt")
            for batch in batches
        ]
        rows = [one_forward.tokenize(first, batch) for batch in batches]
        mixed = [
            [row for j, text in enumerate(batch) for row in one_forward.tokenize((first, second)[j % 2], [text])]
            for batch in batches
        ]

        def run_hf(model, encoded=encoded):
            with torch.inference_mode():
                for inputs in encoded:
                    model(**inputs)

        def run_engine(name, prepared):
            for batch_rows in prepared:
                engines[name].run_batch(batch_rows)

        def run_with_torch_steps(prepared):
            int8_kernels.select("torch")
            try:
                run_engine("engine-split", prepared)
            finally:
                int8_kernels.select("native")

        runners = {
            "bare": lambda: run_hf(bare),
            "peft": lambda: run_hf(peft),
            "engine": lambda rows=rows: run_engine("engine", rows),
            "engine-split": lambda rows=rows: run_engine("engine-split", rows),
            "engine-on": lambda rows=rows: run_engine("engine-on", rows),
            "mixed": lambda mixed=mixed: run_engine("mixed", mixed),
        }
        if precision.integer_products and int8_kernels.kernels() == "native":
            runners["torch-steps"] = lambda rows=rows: run_with_torch_steps(rows)
        times = interleaved(runners, args.rounds)
        relative = ratios(times, "bare", args.statistic)
        outputs = [
            (row, r)
            for batch_rows in rows
            for row, r in zip(batch_rows, one_forward.run_batch(batch_rows).results, strict=True)
        ]
        active = statistics.fmean(len(r.active_sites) / row.adapter.total_adapters for row, r in outputs)
        count = size * args.batches
        report["results"].append(
            {
                "batch_size": size,
                "sentences": count,
                "active_fraction": active,
                "variants": {
                    name: {"sentences_per_s": count / min(samples), "ratio": relative[name], "seconds": samples}
                    for name, samples in times.items()
                },
            }
        )
        print(f"batch {size}: done (active adapters {active:.1%})", file=sys.stderr, flush=True)
    print_variants(report)
    return report


def print_variants(report: dict) -> None:
    sizes = [entry["batch_size"] for entry in report["results"]]
    print(f"\ndtype {report['machine']['dtype']}, {report['machine']['threads']} threads; sentences/s (ratio to (a))")
    print("| variant | " + " | ".join(f"batch {size}" for size in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, label in VARIANTS.items():
        if any(name not in e["variants"] for e in report["results"]):
            continue
        cells = [
            f"{e['variants'][name]['sentences_per_s']:.0f} ({e['variants'][name]['ratio']:.2f}x)"
            for e in report["results"]
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| active adapters (c) | " + " | ".join(f"{e['active_fraction']:.0%}" for e in report["results"]) + " |")


# ---- many adapters ---------------------------------------------------------------------------------


def adapter_bytes(repository) -> int:
    """Bytes of adapter storage in use (bank rows holding an adapter, and heads), over all encoders."""
    total = 0
    for encoder in repository.encoders():
        for layer in encoder.model.layers:
            for bank in layer.banks:
                per_row = sum(t[0].numel() * t.element_size() for t in bank._tensors())
                total += per_row * bank.rows_used
        for head in encoder.model.head_layers.values():
            total += len(head.slot_out_features) * head.weight[0].numel() * head.weight.element_size()
    return total


def many_adapters(args: argparse.Namespace, sizes: list[int], counts: list[int]) -> dict:
    from cogalora.checkpoint import CONFIG_FILE
    from service.engine import Engine
    from service.repository import ModelRepository

    source = args.model_dir / args.adapter
    if not (source / CONFIG_FILE).is_file():
        raise SystemExit(f"no checkpoint {source}")
    largest = max(counts)
    report = {"study": "adapters", "machine": machine(args), "adapter": args.adapter, "results": []}
    with tempfile.TemporaryDirectory(prefix="cogalora-adapters-") as tmp:
        root = Path(tmp)
        names = [f"{args.adapter}-{i:04d}" for i in range(largest)]
        for name in names:  # hard links: N folders, one copy of the bytes on disk
            (root / name).mkdir()
            for file in source.iterdir():
                if file.is_file():
                    os.link(file, root / name / file.name)
        repository = ModelRepository(root, precision=resolve_precision(args.dtype), max_loaded=largest)
        began = time.perf_counter()
        repository.scan()
        scan_seconds = time.perf_counter() - began
        repository.load_encoders()
        engine = Engine(repository, split_by_length=False)
        repository.release(repository.acquire(names[0]))
        engine.warmup()
        rss_one = resident_mb()
        began = time.perf_counter()
        for name in names[1:]:
            repository.release(repository.acquire(name))
        load_seconds = (time.perf_counter() - began) / max(largest - 1, 1)
        rss_all = resident_mb()
        storage = adapter_bytes(repository)
        pinned = {name: repository.acquire(name) for name in names}
        sentences = read_sentences(args.data, max(sizes) * args.batches)
        rng = random.Random(0)
        print(
            f"{largest} adapters: scan {scan_seconds:.2f} s, load {load_seconds * 1e3:.1f} ms/adapter, "
            f"RSS {rss_one:.0f} -> {rss_all:.0f} MB, adapter storage {storage / 2**20:.1f} MB",
            file=sys.stderr,
            flush=True,
        )
        for size in sizes:
            batches = [sentences[i * size : (i + 1) * size] for i in range(args.batches)]
            prepared = {}
            for count in counts:
                order = names[:count]
                rows = []
                for batch in batches:
                    # As many different adapters per batch as possible, in a different order each batch.
                    chosen = rng.sample(order, k=min(count, size)) if count > 1 else [order[0]]
                    rows.append(
                        [
                            row
                            for j, text in enumerate(batch)
                            for row in engine.tokenize(pinned[chosen[j % len(chosen)]], [text])
                        ]
                    )
                prepared[count] = rows
            runners = {
                count: (lambda rows=rows: [engine.run_batch(batch_rows) for batch_rows in rows])
                for count, rows in prepared.items()
            }
            times = interleaved({str(k): v for k, v in runners.items()}, args.rounds)
            relative = ratios(times, str(counts[0]), args.statistic)
            total = size * args.batches
            report["results"].append(
                {
                    "batch_size": size,
                    "per_count": {
                        count: {
                            "sentences_per_s": total / min(times[str(count)]),
                            "ratio_to_one": relative[str(count)],
                            "seconds": times[str(count)],
                        }
                        for count in counts
                    },
                }
            )
        report["memory"] = {
            "adapters": largest,
            "rss_one_adapter_mb": rss_one,
            "rss_all_adapters_mb": rss_all,
            "adapter_storage_mb": storage / 2**20,
            "load_ms_per_adapter": load_seconds * 1e3,
            "scan_seconds": scan_seconds,
        }
        for adapter in pinned.values():
            repository.release(adapter)
    print_adapters(report, counts)
    return report


def print_adapters(report: dict, counts: list[int]) -> None:
    setup = report["machine"]
    print(f"\ndtype {setup['dtype']}, {setup['threads']} threads; sentences/s (ratio to 1 adapter)")
    print(
        "| adapters mixed in the traffic | " + " | ".join(f"batch {e['batch_size']}" for e in report["results"]) + " |"
    )
    print("|---|" + "---|" * len(report["results"]))
    for count in counts:
        cells = [
            f"{e['per_count'][count]['sentences_per_s']:.0f} ({e['per_count'][count]['ratio_to_one']:.2f}x)"
            for e in report["results"]
        ]
        print(f"| {count} | " + " | ".join(cells) + " |")
    memory = report["memory"]
    print(
        f"\n{memory['adapters']} adapters loaded: RSS {memory['rss_one_adapter_mb']:.0f} MB with one, "
        f"{memory['rss_all_adapters_mb']:.0f} MB with all; adapter storage {memory['adapter_storage_mb']:.1f} MB "
        f"({memory['adapter_storage_mb'] * 1024 / memory['adapters']:.0f} KB each); "
        f"load {memory['load_ms_per_adapter']:.1f} ms per adapter; scan {memory['scan_seconds']:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"SKIPPED: sentences not found at {args.data} (pass --data PATH)", file=sys.stderr)
        return 0
    torch.set_num_threads(args.threads)
    from service.engine_tuning import tune_allocator

    tune_allocator()
    if args.adapters:
        counts = sorted({int(count) for count in args.adapters.split(",")})
        sizes = [int(size) for size in (args.batch_sizes or "8,32").split(",")]
        report = many_adapters(args, sizes, counts)
    else:
        sizes = [int(size) for size in (args.batch_sizes or "1,8,32").split(",")]
        report = variants(args, sizes)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
