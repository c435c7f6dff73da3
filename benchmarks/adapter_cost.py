"""Cost of trained adapters of any routed method, through the training-side model (the HyperLoRA study).

``python -m benchmarks.adapter_cost "RAD-LoRA=models/sst2-radlora" "HyperLoRA=runs/sst2s/hyperlora-16k-s0" ...``

The serving engine does not serve every method (HyperLoRA is refused), so this loads each checkpoint
with ``cogalora.load_model`` (the code path ``training evaluate`` uses, identical to the engine's for
the methods it serves) and reports, per adapter:

- parameters it adds to the base model: LoRA matrices of the sites it kept, routers (gate and rank
  heads), HyperLoRA's scale generators, and the classification head;
- adapter memory: those tensors' bytes as stored (float32);
- time per example: padded forwards over batches of real sentences, every model interleaved within a
  round, median over rounds, as milliseconds and as throughput relative to the first model with every
  gate off (the base encoder + head: the floor, measured in the same process).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.engine import add_timing_arguments, interleaved, machine, ratios, read_sentences


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adapter_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="NAME=CHECKPOINT_DIR, one per adapter")
    add_timing_arguments(parser, batch_sizes="1,32")
    args = parser.parse_args(argv)
    args.dtype = "float32"
    for item in args.models:
        if "=" not in item:
            parser.error(f"expected NAME=CHECKPOINT_DIR, got {item!r}")
    return args


def adapter_size(weights) -> dict[str, int]:
    """Parameter counts of one adapter's tensors by role, and their bytes."""
    counts = {"lora": 0, "router": 0, "scale_generator": 0, "head": 0}
    # Heads that scale the adapter's output (HyperLoRA's generators) are adapter-like, the others router parts.
    heads = "scale_generator" if weights.variant.heads_train_with_adapter else "router"
    tensors = []
    for lora_A, lora_B in weights.lora.values():
        counts["lora"] += lora_A.numel() + lora_B.numel()
        tensors += [lora_A, lora_B]
    for router in weights.routers.values():
        gate = [router.w1, router.b1, router.w2, router.b2]
        counts["router"] += sum(part.numel() for part in gate)
        counts[heads] += sum(part.numel() for part in router.heads.values())
        tensors += gate + list(router.heads.values())
    for weight, bias in weights.head.values():
        counts["head"] += weight.numel() + bias.numel()
        tensors += [weight, bias]
    counts["sites"] = len(weights.lora)
    counts["bytes"] = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from cogalora import load_model
    from cogalora.checkpoint import read_adapter

    loaded = {}
    report = {"study": "adapter_cost", "machine": machine(args), "adapters": {}, "results": []}
    for item in args.models:
        name, _, directory = item.partition("=")
        loaded[name] = load_model(directory)
        meta, weights = read_adapter(Path(directory))
        report["adapters"][name] = {"method": meta.method, "path": directory, **adapter_size(weights)}
        print(json.dumps({name: report["adapters"][name]}))
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    sentences = read_sentences(args.data, max(sizes) * args.batches)
    first = next(iter(loaded))
    for size in sizes:
        batches = [sentences[i * size : (i + 1) * size] for i in range(args.batches)]
        encoded = {
            name: [
                model.tokenizer(
                    batch, padding=True, truncation=True, max_length=model.meta.max_length, return_tensors="pt"
                )
                for batch in batches
            ]
            for name, model in loaded.items()
        }

        def run(name: str, force: str | None = None, encoded=encoded) -> None:
            model = loaded[name].model
            with torch.no_grad():
                for inputs in encoded[name]:
                    model(
                        inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"), force_gates=force
                    )

        runners = {"gates off": lambda: run(first, "off")}
        runners |= {name: (lambda name=name: run(name)) for name in loaded}
        times = interleaved(runners, args.rounds)
        count = size * args.batches
        result = {
            "batch_size": size,
            "ms_per_example": {name: 1e3 * statistics.median(samples) / count for name, samples in times.items()},
            "throughput_vs_gates_off": ratios(times, "gates off", args.statistic),
        }
        report["results"].append(result)
        print(json.dumps(result))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
