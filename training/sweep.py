"""A resumable sweep: several methods trained on the same data, budget and seed, then compared.

The config is JSON::

    {"output": "runs/sweep_sst2",
     "common": {"train": "...", "dev": "...", "max_train_examples": 6000, ...},
     "runs": [{"name": "lora", "method": "lora"},
              {"name": "cogalora-l0.5", "method": "cogalora", "lambda": 0.5}, ...]}

``common`` and each run hold :class:`~training.loop.TrainConfig` fields (``lambda`` is accepted
for ``sparsity_lambda``); a run's own fields win. A run whose checkpoint already has metrics is
skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm.auto import tqdm

from cogalora.checkpoint import CheckpointError, read_meta
from cogalora.config import METHODS, PENALISED_METHODS
from training.loop import TrainConfig, run_training
from training.plots import plot_tradeoff

RESULT_COLUMNS = (
    "name",
    "method",
    "lambda",
    "lr",
    "router_lr",
    "accuracy",
    "examples",
    "mean_active_adapters",
    "mean_active_fraction",
    "mean_flops",
    "mean_adapter_flops",
    "removed_sites",
    "train_examples",
    "train_seconds",
)


class SweepConfigError(ValueError):
    pass


@dataclass
class SweepRun:
    name: str
    config: TrainConfig


def load_sweep(path: str | Path) -> tuple[Path, list[SweepRun]]:
    """Parse a sweep config into one :class:`TrainConfig` per run (output under the sweep folder)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SweepConfigError(f"{path}: cannot read sweep config ({exc})") from None
    if not isinstance(spec, dict) or "output" not in spec or not spec.get("runs"):
        raise SweepConfigError(f"{path}: needs an object with 'output' and a non-empty 'runs' list")
    output = Path(spec["output"])
    allowed = {f.name for f in fields(TrainConfig)} - {"output"}
    common = _normalise(spec.get("common", {}), allowed, f"{path}: common")
    runs, names = [], set()
    for index, run in enumerate(spec["runs"]):
        name = run.get("name") if isinstance(run, dict) else None
        if not name or name in names:
            raise SweepConfigError(f"{path}: runs[{index}] needs a unique 'name'")
        names.add(name)
        overrides = _normalise({k: v for k, v in run.items() if k != "name"}, allowed, f"{path}: runs[{index}]")
        settings = common | overrides
        for required in ("train", "dev"):
            if required not in settings:
                raise SweepConfigError(f"{path}: runs[{index}] ({name}) has no {required!r} (set it in 'common')")
        runs.append(SweepRun(name, TrainConfig(output=str(output / name), **settings)))
    return output, runs


def _normalise(settings: dict, allowed: set[str], where: str) -> dict:
    settings = dict(settings)
    if "lambda" in settings:
        settings["sparsity_lambda"] = settings.pop("lambda")
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise SweepConfigError(f"{where}: unknown settings {unknown}")
    return settings


def finished_metrics(directory: Path) -> dict | None:
    """The metrics of a finished run's checkpoint, or None when it has to (re)run."""
    try:
        meta = read_meta(directory)
    except CheckpointError:
        return None
    return meta.metrics if "accuracy" in meta.metrics else None


def run_sweep(path: str | Path, progress: bool = True) -> tuple[Path, list[dict], list[str]]:
    """Train every unfinished run, then write results.csv, results.md and tradeoff.png.

    Returns the output folder, the result rows and the names of runs skipped as finished.
    """
    output, runs = load_sweep(path)
    output.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    bar = tqdm(runs, desc="sweep", unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix(run=run.name)
        metrics = finished_metrics(Path(run.config.output))
        if metrics is None:
            run.config.progress = progress
            metrics = run_training(run.config).metrics
        else:
            skipped.append(run.name)
            tqdm.write(f"sweep: {run.name} already finished, skipped")
        rows.append(result_row(run, metrics))
        write_results(output, rows)
    if rows:
        plot_tradeoff(rows, output / "tradeoff.png", title=f"{Path(path).stem}: dev accuracy vs adapter compute")
    return output, rows, skipped


def result_row(run: SweepRun, metrics: dict) -> dict:
    config = run.config
    return {
        "name": run.name,
        "method": config.method,
        "lambda": config.sparsity_lambda if config.method in PENALISED_METHODS else "",
        "lr": config.learning_rate,
        "router_lr": config.router_lr if config.router_lr is not None else "",
        "accuracy": round(metrics["accuracy"], 4),
        "examples": metrics["examples"],
        "mean_active_adapters": round(metrics["mean_active_adapters"], 2),
        "mean_active_fraction": round(metrics["mean_active_fraction"], 4),
        "mean_flops": round(metrics["mean_flops"]),
        "mean_adapter_flops": round(metrics["mean_adapter_flops"]),
        "removed_sites": len(metrics.get("dropped_sites", [])),
        "train_examples": metrics.get("train_examples", ""),
        "train_seconds": metrics.get("train_seconds", ""),
    }


def write_results(output: Path, rows: list[dict]) -> None:
    with (output / "results.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (output / "results.md").write_text(results_markdown(rows), encoding="utf-8")


def results_markdown(rows: list[dict]) -> str:
    header = (
        "| run | method | λ | dev acc | active adapters | active fraction | adapter FLOPs/ex | total FLOPs/ex "
        "| removed sites | train s |"
    )
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['method']} | {row['lambda']} | {100 * row['accuracy']:.2f} | "
            f"{row['mean_active_adapters']:.2f} | {row['mean_active_fraction']:.3f} | "
            f"{row['mean_adapter_flops']:.3g} | {row['mean_flops']:.3g} | {row['removed_sites']} | "
            f"{row['train_seconds']} |"
        )
    lines += ["", *summary_lines(rows)]
    return "\n".join(lines) + "\n"


def summary_lines(rows: list[dict]) -> list[str]:
    """Best run per method, and how the sparse CoGaLoRA runs compare with plain LoRA."""
    lines = []
    for method in METHODS:
        candidates = [row for row in rows if row["method"] == method]
        if candidates:
            best = max(candidates, key=lambda row: row["accuracy"])
            lines.append(
                f"- best {method}: {best['name']} at {100 * best['accuracy']:.2f} % "
                f"with {best['mean_active_fraction']:.3f} of adapters active"
            )
    lora = [row for row in rows if row["method"] == "lora"]
    if lora:
        reference = max(row["accuracy"] for row in lora)
        for budget in (0.3, 0.4):
            sparse = [row for row in rows if row["method"] == "cogalora" and row["mean_active_fraction"] <= budget]
            if sparse:
                best = max(sparse, key=lambda row: row["accuracy"])
                gap = 100 * (best["accuracy"] - reference)
                lines.append(
                    f"- best CoGaLoRA at ≤ {budget:.0%} active: {best['name']}, {gap:+.2f} points vs plain LoRA"
                )
            else:
                lines.append(f"- no CoGaLoRA run reached ≤ {budget:.0%} active adapters")
    return lines
