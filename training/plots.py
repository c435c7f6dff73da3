"""The sweep's figure: dev accuracy against the adapter compute each method spends per example."""

from __future__ import annotations

from pathlib import Path

from cogalora.config import METHODS

_MARKERS = dict(zip(METHODS, "so^Dvx", strict=True))


def plot_tradeoff(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Two panels: accuracy vs mean active adapters, and vs mean adapter FLOPs per example.

    One legend entry per ``series`` (default: the row's method); rows sharing a ``series`` are
    joined by a line, as are the CoGaLoRA runs of a sweep.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        ("mean_active_adapters", "active adapters per example"),
        ("mean_adapter_flops", "adapter FLOPs per example"),
    )
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(row.get("series") or row["method"], []).append(row)
    for axis, (key, label) in zip(axes, panels, strict=True):
        for name, points in series.items():
            method = points[0]["method"]
            # A named series (e.g. one model at several taus) or the sweep's CoGaLoRA runs form a curve.
            curve = len(points) > 1 and ("series" in points[0] or method == "cogalora")
            points = sorted(points, key=lambda row: float(row[key]))
            xs = [float(row[key]) for row in points]
            ys = [100 * float(row["accuracy"]) for row in points]
            axis.plot(xs, ys, marker=_MARKERS.get(method, "o"), linestyle="-" if curve else "none", label=name)
            for row, x, y in zip(points, xs, ys, strict=True):
                axis.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for row in rows:  # plain LoRA as a reference level across the panel
            if row["method"] == "lora":
                axis.axhline(100 * float(row["accuracy"]), color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(label)
        axis.set_ylabel("dev accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
