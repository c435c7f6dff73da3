"""Choosing the inference threshold tau for a target compute budget.

Gates at later layers depend on the hidden states that earlier gates produced, so every
candidate tau needs its own forward pass; the grid is therefore modest (0.05 steps by
default) and the data may be subsampled.

Two ways to pick among the taus that meet the budget: ``accuracy`` (the most accurate one; this
reads the labels, so the data's accuracy at the chosen tau is optimistic) and ``budget`` (the lowest
tau, i.e. the most adapters the budget allows; label-free, so the same data still gives an
unbiased accuracy, and unlabelled traffic would do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cogalora import CoGaLoRAModel
from training.data import DataError, EncodedDataset
from training.evaluation import evaluate

PICKS: tuple[str, ...] = ("accuracy", "budget")


@dataclass(frozen=True)
class TauPoint:
    tau: float
    accuracy: float
    active_fraction: float
    mean_active_adapters: float
    mean_adapter_flops: float
    per_module_activation_rate: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    """Per-site activation rates at this tau: the service's routing-drift reference (docs/service.md)."""


@dataclass(frozen=True)
class Calibration:
    points: list[TauPoint]
    chosen: TauPoint | None
    """Among points with ``active_fraction <= target``: the most accurate (ties: fewer active), or with
    ``pick="budget"`` the lowest tau; None if none."""
    target_active_fraction: float


def tau_grid(step: float = 0.05) -> list[float]:
    count = round(1.0 / step)
    return [round(i * step, 6) for i in range(count + 1)]


def parse_taus(text: str) -> list[float]:
    try:
        taus = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise DataError(f"--taus must be comma-separated numbers, got {text!r}") from None
    if not taus or not all(0.0 <= tau <= 1.0 for tau in taus):
        raise DataError(f"--taus must list values in [0, 1], got {text!r}")
    return taus


def calibrate(
    model: CoGaLoRAModel,
    dataset: EncodedDataset,
    target_active_fraction: float,
    taus: list[float],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    pick: str = "accuracy",
) -> Calibration:
    if pick not in PICKS:
        raise ValueError(f"unknown pick {pick!r}; choose from {list(PICKS)}")
    points = []
    for tau in taus:
        metrics, _ = evaluate(model, dataset, batch_size, tau=tau, device=device)
        points.append(
            TauPoint(
                tau=tau,
                accuracy=metrics["accuracy"],
                active_fraction=metrics["mean_active_fraction"],
                mean_active_adapters=metrics["mean_active_adapters"],
                mean_adapter_flops=metrics["mean_adapter_flops"],
                per_module_activation_rate=metrics["per_module_activation_rate"],
            )
        )
    feasible = [point for point in points if point.active_fraction <= target_active_fraction + 1e-12]
    if not feasible:
        chosen = None
    elif pick == "budget":
        chosen = min(feasible, key=lambda p: p.tau)
    else:
        chosen = max(feasible, key=lambda p: (p.accuracy, -p.active_fraction, -p.tau))
    return Calibration(points=points, chosen=chosen, target_active_fraction=target_active_fraction)


def format_calibration(calibration: Calibration) -> str:
    lines = [f"{'tau':>6} {'accuracy':>9} {'active':>7} {'adapters':>9} {'adapter FLOPs':>14}"]
    for p in calibration.points:
        mark = "  <- chosen" if p == calibration.chosen else ""
        meets = "" if p.active_fraction <= calibration.target_active_fraction + 1e-12 else " (over budget)"
        lines.append(
            f"{p.tau:6.2f} {p.accuracy:9.4f} {p.active_fraction:7.3f} {p.mean_active_adapters:9.2f} "
            f"{p.mean_adapter_flops:14.4g}{meets}{mark}"
        )
    return "\n".join(lines)
