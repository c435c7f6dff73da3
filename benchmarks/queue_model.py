"""What tail latency a batching server of this shape can reach at all: a queueing model of the engine lanes.

``python -m benchmarks.queue_model --fixed-ms 2.9 --row-ms 1.4``

The service sends each request to the engine process holding the fewest rows (``service/process_pool.py``);
an engine that is free runs everything it holds as one batch (up to ``--max-batch`` rows), and a batch of
``b`` sentences takes ``fixed + row * (b sentences' sizes)`` milliseconds: the forward's fixed cost and
each sentence's own (a sentence's size is its length relative to the mean). This module replays Poisson
arrivals through exactly that, with nothing else on the machine: no API process, no load client, no
other process taking a core, every forward as fast as offline. Its p99 is a floor for the real
service's at the same load: a measured p99 near it has little left to win by scheduling, and a target
below it needs a cheaper forward (``fixed``), not a better queue.

The loads are fractions of the model's own maximum, where every lane runs full batches back to back.
A lone request takes ``api + fixed + row`` (``--api-ms``: HTTP, tokenizing and the trip to the engine,
counted once per request). The model's p99 at half the maximum, over the lone request, is what the
service's open-loop target (3x) is measured against.
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerShape:
    """The costs of the modelled server, in milliseconds."""

    fixed_ms: float
    """Each forward's fixed cost, whatever its batch (module calls, routing, kernel launches)."""
    row_ms: float
    """Each sentence's own cost in a forward, for a sentence of mean length."""
    lanes: int = 2
    """Engine processes, each running one forward at a time."""
    api_ms: float = 1.2
    """Per request outside the engine: half before the forward, half after."""
    max_batch: int = 32
    """Most rows one forward takes."""

    def forward_ms(self, sizes: list[float]) -> float:
        return self.fixed_ms + self.row_ms * sum(sizes)

    @property
    def lone_ms(self) -> float:
        """A request on an idle server, of mean length."""
        return self.api_ms + self.fixed_ms + self.row_ms

    @property
    def max_per_s(self) -> float:
        """Requests per second with every lane running full batches of mean-length sentences."""
        return self.lanes * self.max_batch / self.forward_ms([1.0] * self.max_batch) * 1e3


def simulate(shape: ServerShape, rate_per_s: float, requests: int, sizes: list[float], seed: int = 0) -> list[float]:
    """Latencies (ms, arrival to answer) of ``requests`` Poisson arrivals at ``rate_per_s``; each request's
    size is drawn from ``sizes``."""
    rng = random.Random(seed)
    events: list[tuple[float, int, int]] = []  # (time, kind: 0 arrival at an engine / 1 forward done, index)
    arrived, size = [], []
    clock = 0.0
    for index in range(requests):
        clock += rng.expovariate(rate_per_s / 1e3)
        arrived.append(clock)
        size.append(rng.choice(sizes))
        heapq.heappush(events, (clock + shape.api_ms / 2, 0, index))
    queued: list[deque[int]] = [deque() for _ in range(shape.lanes)]
    running: list[list[int]] = [[] for _ in range(shape.lanes)]
    latencies: list[float] = []

    def start(lane: int, now: float) -> None:
        batch = [queued[lane].popleft() for _ in range(min(len(queued[lane]), shape.max_batch))]
        running[lane] = batch
        if batch:
            heapq.heappush(events, (now + shape.forward_ms([size[i] for i in batch]), 1, lane))

    while events:
        now, kind, index = heapq.heappop(events)
        if kind == 0:  # to the lane holding the fewest rows (the first of equals), as the service does
            lane = min(range(shape.lanes), key=lambda k: len(queued[k]) + len(running[k]))
            queued[lane].append(index)
            if not running[lane]:
                start(lane, now)
            continue
        for done in running[index]:
            latencies.append(now + shape.api_ms / 2 - arrived[done])
        start(index, now)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def sweep(shape: ServerShape, fractions: list[float], requests: int, spread: float) -> list[dict[str, float]]:
    """p50 and p99 at each fraction of the maximum; sentence sizes uniform in ``[1 - spread, 1 + spread]``."""
    sizes = [1.0 - spread + 2 * spread * step / 20 for step in range(21)]
    rows = []
    for fraction in fractions:
        latencies = simulate(shape, fraction * shape.max_per_s, requests, sizes)
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        rows.append({"fraction": fraction, "per_s": fraction * shape.max_per_s, "p50_ms": p50, "p99_ms": p99})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.queue_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixed-ms", type=float, required=True, help="a forward's fixed cost, ms")
    parser.add_argument("--row-ms", type=float, required=True, help="each sentence's own cost in a forward, ms")
    parser.add_argument("--lanes", type=int, default=2, help="engine processes (default: %(default)s)")
    parser.add_argument(
        "--api-ms", type=float, default=1.2, help="per request outside the engine, ms (default: %(default)s)"
    )
    parser.add_argument("--max-batch", type=int, default=32, help="most rows per forward (default: %(default)s)")
    parser.add_argument(
        "--spread", type=float, default=0.5, help="sentence sizes uniform in 1 +- spread (default: %(default)s)"
    )
    parser.add_argument("--requests", type=int, default=100_000, help="arrivals per load (default: %(default)s)")
    parser.add_argument("--fractions", default="0.1,0.25,0.5,0.7,0.85", help="loads, of the maximum")
    args = parser.parse_args(argv)
    if not 0 <= args.spread < 1 or min(args.fixed_ms, args.row_ms, args.api_ms) < 0 or args.row_ms == 0:
        parser.error("need --row-ms > 0, --fixed-ms and --api-ms >= 0, and 0 <= --spread < 1")
    fractions = [float(part) for part in args.fractions.split(",")]
    if not all(0 < fraction < 1 for fraction in fractions):
        parser.error("--fractions must lie strictly between 0 and 1 (at the maximum the queue grows without bound)")
    shape = ServerShape(args.fixed_ms, args.row_ms, args.lanes, args.api_ms, args.max_batch)
    print(f"lone request {shape.lone_ms:.1f} ms; maximum {shape.max_per_s:.0f} requests/s")
    print("| load | requests/s | p50 ms | p99 ms | p99 / lone |\n|---|---|---|---|---|")
    for row in sweep(shape, fractions, args.requests, args.spread):
        cells = [f"{row['fraction']:g}", f"{row['per_s']:.0f}", f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}"]
        print(f"| {' | '.join(cells)} | {row['p99_ms'] / shape.lone_ms:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
