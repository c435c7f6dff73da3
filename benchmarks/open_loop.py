"""A lean open-loop HTTP client: latency under Poisson arrivals, taking little CPU from the server.

Requests arrive on a Poisson schedule fixed in advance (``rate`` per second for ``duration``
seconds, a seeded generator), each on an idle keep-alive connection or a new one: no arrival ever
waits for an earlier answer. A request's latency runs from its *scheduled* arrival to the last
byte of its answer, so a client that falls behind its schedule shows as latency instead of hiding
it. It speaks just enough HTTP/1.1 (prebuilt request bytes, the status line and Content-Length of
the answer) to cost 0.2-0.3 ms of CPU per request (asyncio included), where an httpx request
costs about a millisecond: on a 2-core machine that CPU would otherwise be taken from the server under test.
Python's cyclic collector is off while it measures: a full collection in a process that has
imported torch pauses it for 100 ms or more, which would show as the server's latency.

    python -m benchmarks.open_loop --url http://127.0.0.1:8000 --rate 150 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import statistics
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

#: A pause between requests long enough for a server to go idle (its threads asleep) in between.
IDLE_PAUSE_S = 0.02


@dataclass
class OpenLoopResult:
    answered: int
    """Requests that got an HTTP answer (any status)."""
    offered_per_s: float
    requests_per_s: float
    """Answers per second over the run (from the first arrival to the last answer)."""
    latency_s: dict[str, float]
    """``p50``, ``p90``, ``p99``, ``max`` from scheduled arrival to answer."""
    non_2xx: int
    errors: int
    """Connection failures (no HTTP answer)."""

    def as_dict(self) -> dict:
        return {
            "answered": self.answered,
            "offered_per_s": self.offered_per_s,
            "requests_per_s": self.requests_per_s,
            "latency_s": self.latency_s,
            "non_2xx": self.non_2xx,
            "errors": self.errors,
        }


def post_bytes(url: str, path: str, body: str) -> bytes:
    """One keep-alive ``POST path`` with a JSON ``body``, as bytes on the wire."""
    host = urlsplit(url).netloc
    payload = body.encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send ``request``, read its whole answer; the HTTP status."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    lengths = [int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")]
    if not lengths:
        raise ValueError(f"an answer without Content-Length: {lines[0]}")
    await reader.readexactly(lengths[0])
    return status


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off (after one collection) for the block."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run_open_loop(
    url: str, path: str, bodies: list[str], rate: float, duration: float, seed: int = 0
) -> OpenLoopResult:
    """Poisson arrivals at ``rate`` per second for ``duration`` seconds, each POSTing the next body in turn."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [post_bytes(url, path, body) for body in bodies]
    rng = random.Random(seed)
    offsets, at = [], rng.expovariate(rate)
    while at < duration:
        offsets.append(at)
        at += rng.expovariate(rate)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []
    statuses: list[int] = []
    errors = 0

    async def one(index: int, scheduled: float) -> None:
        nonlocal errors
        request = requests[index % len(requests)]
        # An idle connection may have been closed by the server meanwhile (its keep-alive timeout):
        # then the request goes once more, on a new connection.
        for connection in (idle.pop() if idle else None, None):
            try:
                connection = connection or await asyncio.open_connection(host, port)
                status = await _exchange(*connection, request)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                if connection is not None:
                    connection[1].close()
                continue
            latencies.append(time.perf_counter() - scheduled)
            statuses.append(status)
            idle.append(connection)
            return
        errors += 1

    with collector_paused():
        start = time.perf_counter()
        tasks = []
        for index, offset in enumerate(offsets):
            scheduled = start + offset
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    for _, writer in idle:
        writer.close()
    if not latencies:
        raise RuntimeError(f"no request to {url}{path} was answered ({errors} connection failures)")
    return _result(latencies, statuses, errors, offered_per_s=len(offsets) / duration, elapsed=elapsed)


async def run_sequential(url: str, path: str, bodies: list[str], duration: float, pause: float = 0.0) -> OpenLoopResult:
    """One request at a time on one connection for ``duration`` seconds: the latency of a lone request.

    ``pause``: seconds between an answer and the next request. Back to back (0) the server never
    idles; with a pause each request finds it idle, and pays what waking it costs (threads asleep,
    caches other work has touched): on the 2-core VM about 2 ms more at 20 ms apart.
    """
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 80)
    requests = [post_bytes(url, path, body) for body in bodies]
    latencies, statuses = [], []
    with collector_paused():
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            began = time.perf_counter()
            statuses.append(await _exchange(reader, writer, requests[len(latencies) % len(requests)]))
            latencies.append(time.perf_counter() - began)
            if pause > 0:
                await asyncio.sleep(pause)
    writer.close()
    elapsed = time.perf_counter() - start
    return _result(latencies, statuses, 0, offered_per_s=len(latencies) / elapsed, elapsed=elapsed)


def _result(
    latencies: list[float], statuses: list[int], errors: int, offered_per_s: float, elapsed: float
) -> OpenLoopResult:
    return OpenLoopResult(
        answered=len(latencies),
        offered_per_s=offered_per_s,
        requests_per_s=len(latencies) / elapsed,
        latency_s={
            "p50": statistics.median(latencies),
            "p90": percentile(latencies, 0.90),
            "p99": percentile(latencies, 0.99),
            "max": max(latencies),
        },
        non_2xx=sum(1 for status in statuses if not 200 <= status < 300),
        errors=errors,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.open_loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: %(default)s)")
    parser.add_argument("--adapter", default="sst2", help="adapter every request names (default: sst2)")
    parser.add_argument("--text", default="a gripping, funny and humane film", help="the sentence sent")
    parser.add_argument("--rate", type=float, help="arrivals per second (default: one request at a time)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds (default: 20)")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.0,
        help="without --rate: seconds between an answer and the next request (default: 0, back to back)",
    )
    args = parser.parse_args(argv)
    bodies = [json.dumps({"inputs": args.text, "adapter": args.adapter})]
    if args.rate is None:
        result = asyncio.run(run_sequential(args.url, "/classify", bodies, args.duration, args.pause))
    else:
        result = asyncio.run(run_open_loop(args.url, "/classify", bodies, args.rate, args.duration))
    print(json.dumps(result.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
