"""``python -m training {train,evaluate,calibrate,sweep}``: the command line over the shared functions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from cogalora import METHODS, PACKAGED_MODEL_ID, CheckpointError, load_model, update_meta
from training.calibrate import calibrate, format_calibration, parse_taus, tau_grid
from training.data import Columns, DataError, encode_file
from training.evaluation import evaluate, format_table
from training.loop import DEFAULT_ADAPTER_LR, DEFAULT_FULL_LR, TrainConfig, pick_device, run_training
from training.sweep import SweepConfigError, run_sweep


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where the help already explains them or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _add_columns(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text-column",
        default=None,
        help="TSV/CSV header name or JSONL key of the text (default: first column / 'text')",
    )
    parser.add_argument(
        "--label-column",
        default=None,
        help="TSV/CSV header name or JSONL key of the label (default: last column / 'label')",
    )


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', ...")
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train, evaluate and calibrate CoGaLoRA text classifiers, and run method sweeps.",
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="fine-tune a classifier and save a checkpoint",
        description="Fine-tune with full FT, LoRA, GaLoRA or CoGaLoRA; evaluate on dev each epoch; save a "
        "checkpoint (GaLoRA gates pruned and folded; CoGaLoRA sites whose router never fired on dev dropped).",
        formatter_class=_Formatter,
    )
    train.add_argument("--train", required=True, help="training data (.tsv, .csv or .jsonl)")
    train.add_argument("--dev", required=True, help="dev data, same format")
    train.add_argument("--output", required=True, help="checkpoint directory to write")
    _add_columns(train)
    train.add_argument(
        "--label-names",
        default=None,
        help="comma-separated label list, e.g. 'negative,positive'; labels in the data may be these names or "
        "integer indices into them (default: sorted unique labels of the training data)",
    )
    train.add_argument("--method", choices=METHODS, default="cogalora", help="fine-tuning method")
    train.add_argument("--base-model", default=PACKAGED_MODEL_ID, help="base encoder id or local directory")
    train.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    train.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha/r)")
    train.add_argument(
        "--lambda",
        dest="sparsity_lambda",
        type=float,
        default=0.1,
        help="sparsity penalty weight (CoGaLoRA: lambda*mean p; GaLoRA: lambda*mean|g|)",
    )
    train.add_argument("--tau", type=float, default=0.5, help="inference gate threshold stored in the checkpoint")
    train.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"learning rate (default {DEFAULT_ADAPTER_LR} adapters, {DEFAULT_FULL_LR} full)",
    )
    train.add_argument(
        "--router-lr", type=float, default=None, help="learning rate of routers / GaLoRA gates (default: --lr)"
    )
    train.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    train.add_argument("--warmup-ratio", type=float, default=0.06, help="fraction of steps of linear LR warm-up")
    train.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    train.add_argument("--batch-size", type=int, default=32, help="training batch size")
    train.add_argument("--eval-batch-size", type=int, default=64, help="dev evaluation batch size")
    train.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens")
    train.add_argument("--seed", type=int, default=0, help="random seed (runs are deterministic given it)")
    train.add_argument("--max-train-examples", type=int, default=None, help="use only the first N training rows")
    train.add_argument("--max-dev-examples", type=int, default=None, help="use only the first N dev rows")
    train.add_argument(
        "--warmup-gates-on-steps",
        type=int,
        default=0,
        help="CoGaLoRA: train the first N steps as plain LoRA (all gates on, routers frozen, no penalty)",
    )
    train.add_argument(
        "--router-init-bias", type=float, default=2.0, help="initial router output bias (sigmoid(2) ~ 0.88: mostly on)"
    )
    train.add_argument(
        "--keep-never-fired",
        action="store_true",
        help="CoGaLoRA: keep sites whose router never fired on dev (default: drop them, the freezing trick)",
    )
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    train.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', ...")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate_cmd = commands.add_parser(
        "evaluate",
        help="accuracy, active adapters and FLOPs of a checkpoint",
        description="Evaluate a checkpoint with hard gates. The last stdout line is always one JSON object with "
        "accuracy, examples, mean_active_adapters, mean_active_fraction, mean_flops, mean_adapter_flops.",
        formatter_class=_Formatter,
    )
    evaluate_cmd.add_argument("--model", required=True, help="checkpoint directory")
    evaluate_cmd.add_argument("--data", required=True, help="labelled data (.tsv, .csv or .jsonl)")
    _add_columns(evaluate_cmd)
    evaluate_cmd.add_argument("--tau", type=float, default=None, help="gate threshold (default: the checkpoint's)")
    evaluate_cmd.add_argument("--max-examples", type=int, default=None, help="use only the first N rows")
    evaluate_cmd.add_argument("--json", action="store_true", help="print only the JSON object, no table")
    _add_runtime(evaluate_cmd)

    calibrate_cmd = commands.add_parser(
        "calibrate",
        help="pick tau for a target active fraction and store it in the checkpoint",
        description="Evaluate a CoGaLoRA checkpoint at each tau of a grid (one forward pass per tau, since gates "
        "change later layers' inputs), pick the most accurate tau whose mean active fraction is at most the target, "
        "and write it into cogalora.json.",
        formatter_class=_Formatter,
    )
    calibrate_cmd.add_argument("--model", required=True, help="CoGaLoRA checkpoint directory (updated in place)")
    calibrate_cmd.add_argument("--data", required=True, help="labelled calibration data (use dev, not test)")
    _add_columns(calibrate_cmd)
    calibrate_cmd.add_argument(
        "--target-active-fraction", type=float, required=True, help="largest acceptable mean active fraction"
    )
    calibrate_cmd.add_argument("--step", type=float, default=0.05, help="tau grid step over [0, 1]")
    calibrate_cmd.add_argument(
        "--taus", default=None, help="explicit comma-separated candidate taus instead of the grid (e.g. to refine)"
    )
    calibrate_cmd.add_argument("--max-examples", type=int, default=2000, help="use only the first N rows")
    calibrate_cmd.add_argument("--dry-run", action="store_true", help="print the table, do not update the checkpoint")
    calibrate_cmd.add_argument("--json", action="store_true", help="print only the JSON result")
    _add_runtime(calibrate_cmd)

    sweep = commands.add_parser(
        "sweep",
        help="train and compare several methods (resumable)",
        description="Train every run of a JSON sweep config on the same data, budget and seed (finished runs are "
        "skipped), then write results.csv, results.md and tradeoff.png into the sweep's output folder.",
        formatter_class=_Formatter,
    )
    sweep.add_argument("--config", required=True, help="sweep config JSON (see training/configs/)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (DataError, CheckpointError, SweepConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    config = TrainConfig(
        train=args.train,
        dev=args.dev,
        output=args.output,
        method=args.method,
        base_model=args.base_model,
        text_column=args.text_column,
        label_column=args.label_column,
        label_names=args.label_names,
        rank=args.rank,
        alpha=args.alpha,
        sparsity_lambda=args.sparsity_lambda,
        tau=args.tau,
        lr=args.lr,
        router_lr=args.router_lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        max_length=args.max_length,
        seed=args.seed,
        max_train_examples=args.max_train_examples,
        max_dev_examples=args.max_dev_examples,
        warmup_gates_on_steps=args.warmup_gates_on_steps,
        router_init_bias=args.router_init_bias,
        drop_never_fired=not args.keep_never_fired,
        threads=args.threads,
        device=args.device,
        progress=not args.no_progress,
    )
    result = run_training(config)
    summary = {
        key: value for key, value in result.metrics.items() if key not in ("per_module_activation_rate", "history")
    }
    print(f"saved {result.output}")
    print(json.dumps(summary))
    return 0


def _load(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    loaded = load_model(args.model, device=device)
    dataset = encode_file(
        args.data,
        Columns(args.text_column, args.label_column),
        loaded.meta.labels,
        loaded.tokenizer,
        loaded.meta.max_length,
        args.max_examples,
    )
    return loaded, dataset, device


def _evaluate(args: argparse.Namespace) -> int:
    loaded, dataset, device = _load(args)
    progress = not args.json and sys.stderr.isatty()
    metrics, _ = evaluate(loaded.model, dataset, args.batch_size, tau=args.tau, device=device, progress=progress)
    metrics["tau"] = loaded.meta.tau if args.tau is None else args.tau
    metrics["method"] = loaded.meta.method
    if not args.json:
        print(format_table(metrics))
    print(json.dumps(metrics))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    if not 0.0 <= args.target_active_fraction <= 1.0:
        print("error: --target-active-fraction must lie in [0, 1]", file=sys.stderr)
        return 2
    loaded, dataset, device = _load(args)
    if loaded.meta.method != "cogalora":
        print(
            f"error: tau only matters for cogalora checkpoints, {args.model} is {loaded.meta.method}", file=sys.stderr
        )
        return 2
    taus = parse_taus(args.taus) if args.taus else tau_grid(args.step)
    result = calibrate(loaded.model, dataset, args.target_active_fraction, taus, args.batch_size, device)
    if not args.json:
        print(format_calibration(result))
    payload = {
        "target_active_fraction": args.target_active_fraction,
        "examples": len(dataset),
        "chosen": asdict(result.chosen) if result.chosen else None,
        "points": [asdict(point) for point in result.points],
        "written": False,
    }
    if result.chosen is None:
        print(json.dumps(payload))
        print(f"error: no tau on the grid reaches active fraction <= {args.target_active_fraction}", file=sys.stderr)
        return 1
    if not args.dry_run:
        calibration = {key: payload[key] for key in ("target_active_fraction", "examples", "chosen")}
        calibration["data"] = str(args.data)
        update_meta(Path(args.model), tau=result.chosen.tau, calibration=calibration)
        payload["written"] = True
    print(json.dumps(payload))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    output, rows, skipped = run_sweep(args.config, progress=not args.no_progress)
    print(f"sweep: {len(rows)} runs ({len(skipped)} skipped as finished); results in {output}")
    print(json.dumps({"output": str(output), "runs": [row["name"] for row in rows], "skipped": skipped}))
    return 0


_COMMANDS = {"train": _train, "evaluate": _evaluate, "calibrate": _calibrate, "sweep": _sweep}
