"""The serving benchmark's sweep figure: latency against load, and below it where the time went.

(``server_side``, which reads those parts off ``/metrics``, is tested against a real service in
test_loadtest.py, which starts one.)
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from benchmarks.serving import STACKED_PARTS, plot_sweep


def server_side(tokenize: float, queue: float, engine: float, request: float, rows: float) -> dict[str, float]:
    return {
        "request_ms": request,
        "tokenize_ms": tokenize,
        "queue_ms": queue,
        "engine_ms": engine,
        "batch_ms": engine * 0.9,
        "batch_size": rows,
    }


def sweep(with_split: bool = True) -> dict:
    loads = [  # fraction, requests/s, p50, p99 (s), the server's means
        (0.1, 50.0, 0.010, 0.020, server_side(0.2, 0.5, 7.0, 9.5, 1.0)),
        (0.5, 250.0, 0.020, 0.050, server_side(0.2, 4.5, 10.0, 19.0, 1.6)),
        (1.0, 500.0, 0.100, 0.400, server_side(0.2, 55.0, 60.0, 130.0, 15.0)),
    ]
    points = [
        {"fraction": f, "requests_per_s": rate, "latency_s": {"p50": p50, "p99": p99}}
        | ({"server_side": means} if with_split else {})
        for f, rate, p50, p99, means in loads
    ]
    result = {"points": points, "lone_request_latency_s": 0.008, "maximum_per_s": 505.0, "client": "lean"}
    if with_split:
        result["lone_server_side"] = server_side(0.2, 0.1, 6.0, 7.5, 1.0)
    return result


def test_the_lower_panel_stacks_each_load_s_parts_up_to_its_whole_request(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    result = sweep()
    figure = plot_sweep(result, tmp_path / "sweep.png", "sweep")
    try:
        assert (tmp_path / "sweep.png").stat().st_size > 0
        latency, parts = figure.axes
        means = [result["lone_server_side"], *(p["server_side"] for p in result["points"])]
        columns = len(means)
        bars = parts.patches
        assert len(bars) == columns * (len(STACKED_PARTS) + 1), "one bar per part and load, and the rest"
        for column, mean in enumerate(means):
            stack = bars[column::columns]
            heights = [bar.get_height() for bar in stack]
            assert heights[: len(STACKED_PARTS)] == pytest.approx([mean[key] for key in STACKED_PARTS])
            assert sum(heights) == pytest.approx(mean["request_ms"]), "the grey rest tops it up to the request"
            assert all(b.get_y() == pytest.approx(a.get_y() + a.get_height()) for a, b in pairwise(stack))
        # The maximum's 130 ms bar is more than twice the next (19 ms): cut, and its height written.
        top = parts.get_ylim()[1]
        assert 19.0 < top < 130.0
        labels = [text.get_text() for text in parts.texts]
        assert labels[-1] == "15.0 rows, 130 ms (cut)" and "(cut)" not in "".join(labels[:-1])
        assert latency.get_yscale() == "log"
        three_times_lone = [line for line in latency.lines if line.get_label() == "3x lone request"]
        assert three_times_lone[0].get_ydata()[0] == pytest.approx(24.0)
    finally:
        plt.close(figure)


def test_a_sweep_without_the_server_s_account_draws_the_latency_panel_alone(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = plot_sweep(sweep(with_split=False), tmp_path / "sweep.png", "sweep")
    try:
        (latency,) = figure.axes
        p99 = next(line for line in latency.lines if line.get_label() == "p99 latency")
        assert list(p99.get_xdata()) == [50.0, 250.0, 500.0]
        assert list(p99.get_ydata()) == pytest.approx([20.0, 50.0, 400.0])
    finally:
        plt.close(figure)
