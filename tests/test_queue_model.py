"""The queueing model of the engine lanes (benchmarks/queue_model.py) against results queueing theory knows."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.queue_model import ServerShape, main, simulate


@pytest.mark.parametrize("load", [0.3, 0.6])
def test_one_lane_without_batching_is_the_textbook_single_server_queue(load: float) -> None:
    """Poisson arrivals, one server, every job 1 ms (M/D/1): the mean time in the system is
    1 + load / (2 (1 - load)) ms (Pollaczek-Khinchine)."""
    shape = ServerShape(fixed_ms=0.0, row_ms=1.0, lanes=1, api_ms=0.0, max_batch=1)
    latencies = simulate(shape, load * 1e3, requests=200_000, sizes=[1.0], seed=1)
    assert len(latencies) == 200_000, "every request answered"
    expected = 1 + load / (2 * (1 - load))
    assert statistics.mean(latencies) == pytest.approx(expected, rel=0.03)
    assert min(latencies) == pytest.approx(1.0), "a request that finds the server idle takes its own job only"


def test_a_lone_request_and_the_maximum_follow_from_the_costs() -> None:
    shape = ServerShape(fixed_ms=3.0, row_ms=1.0, lanes=2, api_ms=1.0, max_batch=10)
    assert shape.lone_ms == 5.0
    assert shape.max_per_s == pytest.approx(2 * 10 / 13e-3)
    # At a trickle nobody waits: every request takes about the lone request's time.
    latencies = simulate(shape, 1.0, requests=300, sizes=[1.0], seed=2)
    assert statistics.median(latencies) == pytest.approx(shape.lone_ms)


def test_batches_make_the_tail_grow_with_load_and_the_command_says_so(capsys) -> None:
    assert main(["--fixed-ms", "2.9", "--row-ms", "1.4", "--requests", "20000", "--fractions", "0.1,0.5"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.")]
    ratios = [float(line.split("|")[5].strip().rstrip("x")) for line in lines]
    assert len(ratios) == 2 and 1.0 < ratios[0] < ratios[1]
    with pytest.raises(SystemExit):
        main(["--fixed-ms", "1", "--row-ms", "1", "--fractions", "1.0"])
