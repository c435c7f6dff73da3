"""Several evaluated models side by side: one row per model, and mean ± sd over the models sharing a name.

``python -m training evaluate --model A B C`` prints this table; giving several models the same name
(``--model LoRA=runs/lora-s0 LoRA=runs/lora-s1 ...``) marks them as runs of one recipe (e.g. seeds),
and the table adds a row with their mean ± sample standard deviation, so "within noise" is a number.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: The metrics a comparison aggregates, with their column title and format.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("accuracy", "accuracy %", "pct"),
    ("mean_active_adapters", "active sites", ".2f"),
    ("mean_active_fraction", "fraction", ".3f"),
    ("mean_active_rank", "total rank", ".1f"),
    ("adapter_flops_fraction", "adapter FLOPs vs LoRA", ".3f"),
)


@dataclass(frozen=True)
class ModelSpec:
    """A ``--model`` argument: ``PATH`` or ``NAME=PATH``; the name defaults to the path."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        name, sep, path = text.partition("=")
        if not sep or not name or not path or Path(text).exists():
            return cls(text, text)
        return cls(name, path)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def group_summaries(results: Sequence[dict]) -> list[dict]:
    """For each name given to more than one model, in order of first appearance: the mean and sample sd
    of every compared metric (``accuracy_mean``, ``accuracy_sd``, ...), ``runs`` and the models' paths."""
    groups: dict[str, list[dict]] = {}
    for result in results:
        groups.setdefault(result["name"], []).append(result)
    summaries = []
    for name, members in groups.items():
        if len(members) < 2:
            continue
        summary: dict = {"name": name, "runs": len(members), "models": [member["model"] for member in members]}
        for key, _, _ in COLUMNS:
            summary[f"{key}_mean"], summary[f"{key}_sd"] = mean_sd([float(member[key]) for member in members])
        summaries.append(summary)
    return summaries


def _cell(value: float, style: str) -> str:
    return f"{100 * value:.2f}" if style == "pct" else format(value, style)


def format_comparison(results: Sequence[dict], summaries: Sequence[dict]) -> str:
    """A plain-text table: one row per model, then one ``mean ± sd (n)`` row per repeated name."""
    header = ["model", "method", "tau", *[title for _, title, _ in COLUMNS]]
    rows = []
    for result in results:
        label = result["name"] if result["name"] == result["model"] else f"{result['name']}: {result['model']}"
        tau = result.get("tau")
        routed = result.get("method") in ("cogalora", "radlora", "hyperlora")
        rows.append(
            [label, result.get("method", ""), f"{tau:g}" if routed and tau is not None else "-"]
            + [_cell(float(result[key]), style) for key, _, style in COLUMNS]
        )
    for summary in summaries:
        cells = []
        for key, _, style in COLUMNS:
            mean, sd = summary[f"{key}_mean"], summary[f"{key}_sd"]
            cells.append(f"{_cell(mean, style)} ± {_cell(sd, style)}")
        rows.append([f"{summary['name']} (mean ± sd of {summary['runs']})", "", "", *cells])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    for index, row in enumerate(rows):
        if index == len(results) and summaries:
            lines.append("  ".join("-" * width for width in widths))
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
