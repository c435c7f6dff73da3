"""Choosing the inference threshold tau for a serving budget.

The budget is a mean active fraction of sites (``--target-active-fraction``) or, for RAD-LoRA, a mean
total active rank per example (``--target-active-rank``: the sum over sites of the rank each example
uses). Gates at later layers depend on the hidden states that earlier gates produced, so every
candidate tau needs its own forward pass; the grid is therefore modest (0.05 steps by
default) and the data may be subsampled.

Two ways to pick among the taus that meet the budget: ``accuracy`` (the most accurate one; this
reads the labels, so the data's accuracy at the chosen tau is optimistic) and ``budget`` (the lowest
tau, i.e. the most adapters the budget allows; label-free, so the same data still gives an
unbiased accuracy, and unlabelled traffic would do). A tau at which no adapter runs for any example
is never picked: that model is the bare encoder and head, not a calibrated adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from cogalora import CoGaLoRAModel
from training.data import DataError, EncodedDataset
from training.evaluation import evaluate

PICKS: tuple[str, ...] = ("accuracy", "budget")
_SLACK = 1e-9


@dataclass(frozen=True)
class TauPoint:
    tau: float
    accuracy: float
    active_fraction: float
    mean_active_adapters: float
    mean_adapter_flops: float
    mean_active_rank: float = 0.0
    per_module_activation_rate: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    """Per-site activation rates at this tau: the service's routing-drift reference (docs/service.md)."""

    @property
    def all_off(self) -> bool:
        """No adapter ran for any example."""
        return self.mean_active_adapters == 0.0


@dataclass(frozen=True)
class Budget:
    """What a tau must keep within ``limit``: the mean active fraction of sites, or the mean total active rank."""

    kind: str
    """``fraction`` or ``rank``."""
    limit: float

    def __post_init__(self) -> None:
        if self.kind not in ("fraction", "rank"):
            raise ValueError(f"unknown budget kind {self.kind!r}")

    @property
    def key(self) -> str:
        """The point attribute (and the ``calibration`` record's field) that the budget limits."""
        return "active_fraction" if self.kind == "fraction" else "mean_active_rank"

    @property
    def target_name(self) -> str:
        return "target_active_fraction" if self.kind == "fraction" else "target_active_rank"

    def met(self, point: TauPoint) -> bool:
        return getattr(point, self.key) <= self.limit + _SLACK

    def describe(self) -> str:
        return f"{'active fraction' if self.kind == 'fraction' else 'total active rank'} <= {self.limit:g}"


@dataclass(frozen=True)
class Calibration:
    points: list[TauPoint]
    chosen: TauPoint | None
    """Among points within the budget at which some adapter still runs: the most accurate (ties: fewer
    active), or with ``pick="budget"`` the lowest tau; None if none."""
    budget: Budget

    @property
    def only_all_off(self) -> bool:
        """Every tau within the budget switches every adapter off (so none was chosen)."""
        within = [point for point in self.points if self.budget.met(point)]
        return bool(within) and all(point.all_off for point in within)


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
    budget: Budget,
    taus: list[float],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    pick: str = "accuracy",
    progress: bool = False,
) -> Calibration:
    """One forward over ``dataset`` per tau; the pick among the taus within ``budget`` (see the module)."""
    if pick not in PICKS:
        raise ValueError(f"unknown pick {pick!r}; choose from {list(PICKS)}")
    points = []
    for tau in tqdm(taus, desc="calibrate", unit="tau", disable=not progress):
        metrics, _ = evaluate(model, dataset, batch_size, tau=tau, device=device, progress=progress)
        points.append(
            TauPoint(
                tau=tau,
                accuracy=metrics["accuracy"],
                active_fraction=metrics["mean_active_fraction"],
                mean_active_adapters=metrics["mean_active_adapters"],
                mean_adapter_flops=metrics["mean_adapter_flops"],
                mean_active_rank=metrics["mean_active_rank"],
                per_module_activation_rate=metrics["per_module_activation_rate"],
            )
        )
    feasible = [point for point in points if budget.met(point) and not point.all_off]
    if not feasible:
        chosen = None
    elif pick == "budget":
        chosen = min(feasible, key=lambda p: p.tau)
    else:
        chosen = max(feasible, key=lambda p: (p.accuracy, -p.active_fraction, -p.tau))
    return Calibration(points=points, chosen=chosen, budget=budget)


def format_calibration(calibration: Calibration) -> str:
    lines = [f"{'tau':>6} {'accuracy':>9} {'active':>7} {'adapters':>9} {'total rank':>10} {'adapter FLOPs':>14}"]
    for p in calibration.points:
        notes = []
        if not calibration.budget.met(p):
            notes.append("over budget")
        if p.all_off:
            notes.append("every adapter off")
        note = f" ({', '.join(notes)})" if notes else ""
        mark = "  <- chosen" if p == calibration.chosen else ""
        lines.append(
            f"{p.tau:6.2f} {p.accuracy:9.4f} {p.active_fraction:7.3f} {p.mean_active_adapters:9.2f} "
            f"{p.mean_active_rank:10.1f} {p.mean_adapter_flops:14.4g}{note}{mark}"
        )
    return "\n".join(lines)
