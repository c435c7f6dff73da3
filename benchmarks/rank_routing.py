"""RAD-LoRA in the engine: rows grouped by rank (what the engine does) against one masked product.

``python -m benchmarks.rank_routing [--adapter sst2-radlora] [--batch-sizes 1,8,32]``

Per batch of real full SST-2 sentences, one padded forward each (no length chunks), as throughput
ratios to the engine with every gate off (base encoder + routers' absence + head: the floor):

  grouped   the engine: at each site the active rows are grouped by their chosen rank and each group
            runs ``x A[:k]^T B[:, :k]^T`` at its own rank (one pair of products per rank in use)
  masked    the alternative: one pair of full-rank products over all active rows, ``A x`` multiplied
            by each row's 0/1 rank mask (fewer kernels, full-rank arithmetic for every active row)
  all-on    every gate on at full rank (plain LoRA through the engine)
  cogalora  the CoGaLoRA adapter ``--reference`` (models/sst2) on the same batches

Both RAD-LoRA variants are checked to give the same probabilities (to 1e-4) before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.engine import ROOT, add_timing_arguments, interleaved, machine, ratios, read_sentences


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rank_routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models", help="checkpoint folders (default: models/)")
    parser.add_argument("--adapter", default="sst2-radlora", help="the RAD-LoRA adapter (default: sst2-radlora)")
    parser.add_argument("--reference", default="sst2", help="a CoGaLoRA adapter on the same batches (default: sst2)")
    add_timing_arguments(parser, batch_sizes="1,8,32")
    args = parser.parse_args(argv)
    args.dtype = "float32"
    return args


@contextmanager
def masked_rank_products():
    """Replace the engine's per-rank grouping by one full-rank product with masked ``A x`` (benchmark only)."""
    from cogalora.layer import GatedLoraLinear

    grouped = GatedLoraLinear._forward_route

    def masked(self, x, out, route):
        bank = self.banks[route.bank]
        if bank.rank_set is None or not route.routed:
            return grouped(self, x, out, route)
        state = self.routing
        logits, rank_logits = self._route_scores(bank, state.pooled(x), route)
        choice = rank_logits.argmax(dim=1)
        ranks = bank.rank_choices[choice]
        active = (logits > route.threshold) & (ranks > 0)
        state.record(self.site.index, logits, active, route.present, torch.where(active, ranks, 0))
        rows = active.nonzero().squeeze(1)
        if rows.shape[0] == 0:
            return None
        bank_rows = route.rows if isinstance(route.rows, int) else route.rows.index_select(0, rows)
        lora_A = bank.lora_A[bank_rows] if isinstance(bank_rows, int) else bank.lora_A.index_select(0, bank_rows)
        lora_B = bank.lora_B[bank_rows] if isinstance(bank_rows, int) else bank.lora_B.index_select(0, bank_rows)
        selected = x.index_select(0, rows)
        down = selected @ lora_A.transpose(-1, -2)
        down = down * bank.rank_masks.index_select(0, choice.index_select(0, rows))[:, None, :].to(down.dtype)
        update = (down @ lora_B.transpose(-1, -2)) * bank.output_scale
        out.index_add_(0, rows, update)
        return None

    GatedLoraLinear._forward_route = masked
    try:
        yield
    finally:
        GatedLoraLinear._forward_route = grouped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from service.engine import Engine
    from service.repository import ModelRepository

    repository = ModelRepository(args.model_dir)
    repository.scan()
    for name in (args.adapter, args.reference):
        if name not in repository.names():
            raise SystemExit(f"adapter {name!r} not in {args.model_dir} (found {repository.names()})")
    engine = Engine(repository, split_by_length=False)
    engine_off = Engine(repository, split_by_length=False, force_gates="off")
    engine_on = Engine(repository, split_by_length=False, force_gates="on")
    rad, reference = repository.acquire(args.adapter), repository.acquire(args.reference)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    sentences = read_sentences(args.data, max(sizes) * args.batches)
    report = {"study": "rank_routing", "machine": machine(args), "adapter": args.adapter, "results": []}
    for size in sizes:
        batches = [sentences[i * size : (i + 1) * size] for i in range(args.batches)]
        rad_rows = [engine.tokenize(rad, batch) for batch in batches]
        reference_rows = [engine.tokenize(reference, batch) for batch in batches]
        grouped_results = [r for rows in rad_rows for r in engine.run_batch(rows).results]
        with masked_rank_products():
            masked_results = [r for rows in rad_rows for r in engine.run_batch(rows).results]
        for mine, theirs in zip(grouped_results, masked_results, strict=True):
            assert mine.active_ranks == theirs.active_ranks, "masked and grouped paths disagree on ranks"
            assert max(abs(a - b) for a, b in zip(mine.probabilities, theirs.probabilities, strict=True)) < 1e-4, (
                "masked and grouped paths disagree on scores"
            )

        def run(which, prepared):
            for rows in prepared:
                which.run_batch(rows)

        def run_masked(prepared=rad_rows):
            with masked_rank_products():
                run(engine, prepared)

        runners = {
            "off": lambda p=rad_rows: run(engine_off, p),
            "grouped": lambda p=rad_rows: run(engine, p),
            "masked": run_masked,
            "all-on": lambda p=rad_rows: run(engine_on, p),
            "cogalora": lambda p=reference_rows: run(engine, p),
        }
        times = interleaved(runners, args.rounds)
        relative = ratios(times, "off", args.statistic)
        count = size * args.batches
        report["results"].append(
            {
                "batch_size": size,
                "rows_per_s": {name: count / statistics.median(samples) for name, samples in times.items()},
                "throughput_vs_gates_off": relative,
                "mean_active_rank": statistics.fmean(r.active_rank for r in grouped_results),
                "mean_active_adapters": statistics.fmean(r.active_adapters for r in grouped_results),
            }
        )
        print(json.dumps(report["results"][-1]))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
