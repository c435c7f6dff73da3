"""``python -m training {train,evaluate,calibrate,sweep}``: the command line over the shared functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import get_args, get_type_hints

import torch

from cogalora import CheckpointError, load_model, update_meta
from cogalora.config import ROUTED_METHODS, spoken
from cogalora.precision import PRECISION_CHOICES, resolve_device, resolve_precision
from training.calibrate import PICKS, Budget, calibrate, format_calibration, parse_taus, tau_grid
from training.comparison import ModelSpec, format_comparison, group_summaries
from training.data import Columns, DataError, encode_file
from training.evaluation import compare_predictions, evaluate, format_table
from training.loop import TrainConfig, TrainConfigError, TrainingDivergedError, run_training
from training.plots import AXES, DEFAULT_AXES, plot_tradeoff
from training.sweep import SweepConfigError, run_sweep


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where the help already explains them or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        switch = action.nargs == 0  # store_true / store_false: the flag's help says what it does
        if switch or "default" in (action.help or "") or action.default is None or action.default is argparse.SUPPRESS:
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


_GROUP_TITLES = {
    "data": "data",
    "model": "model and adapters",
    "training": "optimisation",
    "routing": "routing and sparsity (CoGaLoRA)",
    "runtime": "runtime",
}


def _add_config_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of a config dataclass, with the field's default, type, choices and help.

    Fields are declared with :func:`training.loop.option`; a field without a default is a required
    flag, a boolean that defaults to True gets its ``off_flag``, one that defaults to False a switch.
    """
    hints = get_type_hints(config_class)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for item in fields(config_class):
        meta = item.metadata
        group_name = meta.get("group", "training")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(_GROUP_TITLES.get(group_name, group_name))
        group = groups[group_name]
        flag = meta.get("flag") or "--" + item.name.replace("_", "-")
        kind = _scalar_type(hints[item.name])
        if kind is bool:
            if item.default:
                group.add_argument(meta["off_flag"], dest=item.name, action="store_false", help=meta["help"])
            else:
                group.add_argument(flag, dest=item.name, action="store_true", help=meta["help"])
            continue
        options: dict = {"dest": item.name, "type": kind, "help": meta["help"]}
        if item.default is MISSING:
            options["required"] = True
        else:
            options["default"] = item.default
        if "choices" in meta:
            options["choices"] = meta["choices"]
        group.add_argument(flag, **options)


def _scalar_type(hint: object) -> type:
    """``int`` for ``int`` and ``int | None``, and so on."""
    candidates = [arg for arg in get_args(hint) if arg is not type(None)] or [hint]
    (kind,) = candidates
    return kind


def _command(commands: argparse._SubParsersAction, name: str, **options) -> argparse.ArgumentParser:
    """A subcommand that remembers its parser, so that a misspelt flag is reported with its own usage."""
    command = commands.add_parser(name, **options)
    command.set_defaults(command_parser=command)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train, evaluate and calibrate CoGaLoRA text classifiers, and run method sweeps.",
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = _command(
        commands,
        "train",
        help="fine-tune a classifier and save a checkpoint",
        description="Fine-tune with full FT, LoRA, GaLoRA, CoGaLoRA or RAD-LoRA (CoGaLoRA whose routers also pick "
        "a rank per example); evaluate on dev each epoch; save a "
        "checkpoint (GaLoRA gates pruned and folded; CoGaLoRA sites whose router never fired on dev dropped).",
        formatter_class=_Formatter,
    )
    _add_config_options(train, TrainConfig)

    evaluate_cmd = _command(
        commands,
        "evaluate",
        help="accuracy, active adapters and FLOPs of one checkpoint, or a comparison table of several",
        description="Evaluate checkpoints with hard gates. One model: a table, then (always the last stdout line) "
        "one JSON object with accuracy, examples, mean_active_adapters, mean_active_fraction, mean_active_rank (sum "
        "over sites of the rank each example used, averaged; 288 = 36 sites at rank 8), mean_flops, "
        "mean_adapter_flops. Several models: one comparison table, with mean ± sd over models given the same NAME "
        '(e.g. seeds), and a last line {"models": [...], "groups": [...]}.',
        formatter_class=_Formatter,
    )
    evaluate_cmd.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="[NAME=]DIR",
        help="checkpoint directory, or several; NAME= labels one in the table, and models sharing a NAME are "
        "summarised as mean ± sd",
    )
    evaluate_cmd.add_argument("--data", required=True, help="labelled data (.tsv, .csv or .jsonl)")
    _add_columns(evaluate_cmd)
    evaluate_cmd.add_argument("--tau", type=float, default=None, help="gate threshold (default: the checkpoint's)")
    evaluate_cmd.add_argument("--max-examples", type=int, default=None, help="use only the first N rows")
    evaluate_cmd.add_argument("--json", action="store_true", help="print only the JSON object, no table")
    evaluate_cmd.add_argument(
        "--dtype",
        choices=PRECISION_CHOICES,
        default="float32",
        help="precision of encoder, adapters and head (routers stay float32; int8: exact integer products, "
        "as the service serves by default); 'auto': the device's fastest batch-invariant one. Other than "
        "float32, the data is also run in float32 and the JSON adds accuracy_float32, "
        "gates_differing_fraction (of (row, site) pairs) and labels_differing",
    )
    _add_runtime(evaluate_cmd)

    calibrate_cmd = _command(
        commands,
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
    budget = calibrate_cmd.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-active-fraction", type=float, help="largest acceptable mean active fraction")
    budget.add_argument(
        "--target-active-rank",
        type=float,
        help="RAD-LoRA: largest acceptable mean total active rank per example (sum over sites of the rank used)",
    )
    calibrate_cmd.add_argument("--step", type=float, default=0.05, help="tau grid step over [0, 1]")
    calibrate_cmd.add_argument(
        "--taus", default=None, help="explicit comma-separated candidate taus instead of the grid (e.g. to refine)"
    )
    calibrate_cmd.add_argument(
        "--pick",
        choices=PICKS,
        default="accuracy",
        help="among the taus within the budget: the most accurate (reads labels: optimistic on the same data), "
        "or 'budget': the lowest tau, the most adapters the budget allows (label-free); a tau that switches "
        "every adapter off is never picked",
    )
    calibrate_cmd.add_argument("--max-examples", type=int, default=2000, help="use only the first N rows")
    calibrate_cmd.add_argument("--dry-run", action="store_true", help="print the table, do not update the checkpoint")
    calibrate_cmd.add_argument("--json", action="store_true", help="print only the JSON result")
    _add_runtime(calibrate_cmd)

    sweep = _command(
        commands,
        "sweep",
        help="train and compare several methods (resumable)",
        description="Train every run of a JSON sweep config on the same data, budget and seed (finished runs are "
        "skipped), then write results.csv, results.md and tradeoff.png into the sweep's output folder.",
        formatter_class=_Formatter,
    )
    sweep.add_argument("--config", required=True, help="sweep config JSON (see training/configs/)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    plot = _command(
        commands,
        "plot",
        help="plot accuracy against active adapters and adapter FLOPs from evaluate/calibrate results",
        description="Read JSON objects written by 'evaluate --json' (a point; several models: a point each, "
        "labelled by their names) or 'calibrate --json' (a curve over tau), one file each, NAME=FILE to label it "
        "(default: the file name), and draw accuracy against mean active adapters and against mean adapter FLOPs "
        "per example (--axes picks others, e.g. mean_active_rank).",
        formatter_class=_Formatter,
    )
    plot.add_argument(
        "results", nargs="+", help="NAME=FILE or FILE: the output of 'evaluate --json' or 'calibrate --json'"
    )
    plot.add_argument("--output", required=True, help="PNG file to write")
    plot.add_argument(
        "--axes",
        default=",".join(DEFAULT_AXES),
        help=f"comma-separated x axes, one panel each, from: {', '.join(AXES)}",
    )
    plot.add_argument("--title", default="", help="figure title")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _show_warnings()
    try:
        return _COMMANDS[args.command](args)
    except (DataError, CheckpointError, SweepConfigError, TrainConfigError, TrainingDivergedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


class _StderrHandler(logging.StreamHandler):
    """Writes ``warning: ...`` to whatever ``sys.stderr`` is when a record comes (redirections swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property always reads sys.stderr
        pass

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _show_warnings() -> None:
    """The training package's warnings (data columns, ignored flags) on stderr, once however often main runs."""
    logger = logging.getLogger("training")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.INFO)


def _train(args: argparse.Namespace) -> int:
    config = TrainConfig(**{item.name: getattr(args, item.name) for item in fields(TrainConfig)})
    result = run_training(config)
    if not result.written:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    summary = {
        key: value for key, value in result.metrics.items() if key not in ("per_module_activation_rate", "history")
    }
    print(f"saved {result.output}")
    print(json.dumps(summary))
    return 0


def _load(args: argparse.Namespace, model: str):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    loaded = load_model(model, device=device)
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
    specs = [ModelSpec.parse(text) for text in args.model]
    results = []
    for spec in specs:
        metrics = _evaluate_one(args, spec.path)
        if len(specs) == 1:
            if not args.json:
                print(format_table(metrics))
            print(json.dumps(metrics))
            return 0
        rates = metrics.pop("per_module_activation_rate", None)
        results.append({"name": spec.name, "model": spec.path, **metrics, "per_module_activation_rate": rates})
    summaries = group_summaries(results)
    if not args.json:
        print(format_comparison(results, summaries))
    print(json.dumps({"data": str(args.data), "models": results, "groups": summaries}))
    return 0


def _evaluate_one(args: argparse.Namespace, model: str) -> dict:
    loaded, dataset, device = _load(args, model)
    progress = not args.no_progress
    precision = resolve_precision(args.dtype, device)
    reference = None
    if precision.name != "float32":
        reference_metrics, reference = evaluate(
            loaded.model, dataset, args.batch_size, tau=args.tau, device=device, progress=progress
        )
        loaded.model.set_precision(precision)
    metrics, predictions = evaluate(
        loaded.model, dataset, args.batch_size, tau=args.tau, device=device, progress=progress
    )
    metrics["tau"] = loaded.meta.tau if args.tau is None else args.tau
    metrics["method"] = loaded.meta.method
    metrics["dtype"] = precision.name
    if reference is not None:
        metrics["accuracy_float32"] = reference_metrics["accuracy"]
        metrics.update(compare_predictions(reference, predictions))
    return metrics


def _plot(args: argparse.Namespace) -> int:
    axes = tuple(key.strip() for key in args.axes.split(",") if key.strip())
    unknown = [key for key in axes if key not in AXES]
    if unknown or not axes:
        args.command_parser.error(f"--axes: unknown {', '.join(unknown) or 'none given'}; choose from {list(AXES)}")
    rows = []
    for item in args.results:
        name, _, path = item.rpartition("=")
        rows += _plot_rows(Path(path), name or Path(path).stem, axes)
    print(f"wrote {plot_tradeoff(rows, args.output, title=args.title, axes=axes)}")
    return 0


def _plot_rows(path: Path, name: str, axes: tuple[str, ...] = DEFAULT_AXES) -> list[dict]:
    """One point from an ``evaluate --json`` result, or a curve (``series``) from a ``calibrate --json`` one."""
    expected = "expected the output of 'evaluate --json' or 'calibrate --json'"
    try:
        lines = path.read_text(encoding="utf-8").strip().splitlines()
        result = json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable ({exc}); {expected}") from exc
    if not isinstance(result, dict):
        raise DataError(f"{path}: not a JSON object; {expected}")
    if "points" in result:  # calibrate: the same model at each tau
        rows = [
            point | {"method": "cogalora", "name": str(point.get("tau")), "series": name} for point in result["points"]
        ]
        required = ("tau", "accuracy", *axes)
    elif "models" in result:  # evaluate of several models: one point each, models sharing a name one series
        rows = [
            model | {"series": model.get("name") or name, "name": Path(str(model.get("model"))).name, "curve": False}
            for model in result["models"]
        ]
        required = ("method", "accuracy", *axes)
    else:
        rows = [result | {"name": name, "series": name}]
        required = ("method", "accuracy", *axes)
    missing = sorted({key for row in rows for key in required if key not in row})
    if missing or not rows:
        raise DataError(f"{path}: missing {', '.join(missing) or 'points'}; {expected}")
    return rows


def _calibrate(args: argparse.Namespace) -> int:
    if args.target_active_fraction is not None:
        budget = Budget("fraction", args.target_active_fraction)
        if not 0.0 <= budget.limit <= 1.0:
            print("error: --target-active-fraction must lie in [0, 1]", file=sys.stderr)
            return 2
    else:
        budget = Budget("rank", args.target_active_rank)
        if budget.limit < 0:
            print("error: --target-active-rank must be >= 0", file=sys.stderr)
            return 2
    loaded, dataset, device = _load(args, args.model)
    if loaded.meta.method not in ROUTED_METHODS:
        print(
            f"error: tau only matters for {spoken(ROUTED_METHODS)} checkpoints, {args.model} is {loaded.meta.method}",
            file=sys.stderr,
        )
        return 2
    taus = parse_taus(args.taus) if args.taus else tau_grid(args.step)
    result = calibrate(
        loaded.model,
        dataset,
        budget,
        taus,
        args.batch_size,
        device,
        pick=args.pick,
        progress=not args.no_progress,
    )
    if not args.json:
        print(format_calibration(result))
    payload = {
        budget.target_name: budget.limit,
        "pick": args.pick,
        "examples": len(dataset),
        "chosen": asdict(result.chosen) if result.chosen else None,
        "points": [_without_rates(asdict(point)) for point in result.points],
        "written": False,
    }
    if result.chosen is None:
        print(json.dumps(payload))
        if result.only_all_off:
            off = ", ".join(f"{point.tau:g}" for point in result.points if budget.met(point))
            print(
                f"error: every tau within the budget ({budget.describe()}: {off}) switches every adapter off, "
                "which would serve the bare encoder; raise the budget or try lower --taus",
                file=sys.stderr,
            )
        else:
            print(f"error: no tau on the grid reaches {budget.describe()}", file=sys.stderr)
        return 1
    if not args.dry_run:
        calibration = {key: payload[key] for key in (budget.target_name, "examples", "chosen")}
        calibration["data"] = str(args.data)
        update_meta(Path(args.model), tau=result.chosen.tau, calibration=calibration)
        payload["written"] = True
    payload["chosen"] = _without_rates(payload["chosen"])
    print(json.dumps(payload))
    return 0


def _without_rates(point: dict) -> dict:
    """A calibration point for printing: the per-site rates (36 numbers) only go into cogalora.json."""
    return {key: value for key, value in point.items() if key != "per_module_activation_rate"}


def _sweep(args: argparse.Namespace) -> int:
    output, rows, skipped = run_sweep(args.config, progress=not args.no_progress)
    print(f"sweep: {len(rows)} runs ({len(skipped)} skipped as finished); results in {output}")
    print(json.dumps({"output": str(output), "runs": [row["name"] for row in rows], "skipped": skipped}))
    return 0


_COMMANDS = {"train": _train, "evaluate": _evaluate, "calibrate": _calibrate, "sweep": _sweep, "plot": _plot}
