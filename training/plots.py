"""The sweep's figure: dev accuracy against the adapter compute each method spends per example."""

from __future__ import annotations

from pathlib import Path

_MARKERS = {"full": "s", "lora": "o", "galora": "^", "cogalora": "D", "radlora": "v", "hyperlora": "P"}

#: The x axes a panel can show: a metric of ``evaluate`` (and of ``calibrate``'s points) and its label.
AXES: dict[str, str] = {
    "mean_active_adapters": "active adapters per example",
    "mean_adapter_flops": "adapter FLOPs per example",
    "mean_active_rank": "total active rank per example (sum over sites)",
    "mean_active_fraction": "active fraction of sites",
}
DEFAULT_AXES: tuple[str, ...] = ("mean_active_adapters", "mean_adapter_flops")


def plot_tradeoff(rows: list[dict], path: str | Path, title: str = "", axes: tuple[str, ...] = DEFAULT_AXES) -> Path:
    """One panel per x axis (default: mean active adapters, and mean adapter FLOPs per example), accuracy on y.

    One legend entry per ``series`` (default: the row's method); rows sharing a ``series`` are
    joined by a line, as are the CoGaLoRA runs of a sweep, unless a row says ``"curve": False``
    (e.g. seeds of one recipe: separate points, not a curve).
    """
    unknown = [key for key in axes if key not in AXES]
    if unknown or not axes:
        raise ValueError(f"unknown plot axes {unknown}; choose from {list(AXES)}")
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 4.2), squeeze=False)
    series: dict[str, list[dict]] = {}
    for row in rows:
        series.setdefault(row.get("series") or row["method"], []).append(row)
    for axis, key in zip(panels[0], axes, strict=True):
        label = AXES[key]
        for name, points in series.items():
            method = points[0]["method"]
            # A named series (e.g. one model at several taus) or the sweep's CoGaLoRA runs form a curve.
            curve = len(points) > 1 and ("series" in points[0] or method == "cogalora")
            curve = curve and points[0].get("curve", True)
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
    panels[0][0].legend(loc="lower right", fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
