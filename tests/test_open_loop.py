"""The lean open-loop client of the benchmarks (benchmarks/open_loop.py) against a real local HTTP server."""

from __future__ import annotations

import asyncio
import json

from benchmarks.open_loop import run_open_loop, run_sequential


class LoopbackServer:
    """HTTP/1.1 on loopback: answers 503 to every 5th request and, with ``close_every``, closes the
    connection after every n-th answer without saying so (as a server does with a keep-alive
    connection that has been idle too long)."""

    def __init__(self, close_every: int | None = None) -> None:
        self.close_every = close_every
        self.requests = 0
        self.refused = 0
        self.bodies: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aenter__(self) -> LoopbackServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = next(line for line in head.split("\r\n") if line.startswith("Content-Length"))
                self.bodies.append((await reader.readexactly(int(length.split(":")[1]))).decode())
                self.requests += 1
                status = 503 if self.requests % 5 == 0 else 200
                self.refused += status == 503
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
                await writer.drain()
                if self.close_every and self.requests % self.close_every == 0:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def test_every_arrival_is_answered_once_and_refusals_are_counted_even_when_the_server_drops_connections():
    bodies = [json.dumps({"inputs": f"sentence {i}"}) for i in range(7)]
    async with LoopbackServer(close_every=3) as server:
        result = await run_open_loop(server.url, "/classify", bodies, rate=300.0, duration=0.5, seed=3)
    arrivals = round(result.offered_per_s * 0.5)
    assert arrivals > 50, "a Poisson schedule of about 150 arrivals"
    assert result.errors == 0, "a request on a connection the server had closed went again on a new one"
    assert server.requests == result.answered == arrivals, "every arrival reached the server exactly once"
    assert result.non_2xx == server.refused > 0
    assert sorted(server.bodies) == sorted(bodies[i % len(bodies)] for i in range(arrivals)), "the bodies in turn"
    assert 0 < result.latency_s["p50"] <= result.latency_s["p99"] <= result.latency_s["max"]


async def test_the_seed_fixes_the_schedule() -> None:
    async with LoopbackServer() as server:
        first = await run_open_loop(server.url, "/classify", ["{}"], rate=200.0, duration=0.3, seed=11)
        second = await run_open_loop(server.url, "/classify", ["{}"], rate=200.0, duration=0.3, seed=11)
        third = await run_open_loop(server.url, "/classify", ["{}"], rate=200.0, duration=0.3, seed=12)
    assert first.answered == second.answered != third.answered


async def test_one_request_at_a_time_counts_every_answer_and_refusal() -> None:
    async with LoopbackServer() as server:
        result = await run_sequential(server.url, "/classify", ["{}"], duration=0.2)
    assert server.requests == result.answered >= 5
    assert result.non_2xx == server.refused == result.answered // 5
    assert result.errors == 0 and 0 < result.latency_s["p50"] <= result.latency_s["max"]


async def test_a_pause_separates_the_requests() -> None:
    """0.2 s with 0.05 s pauses leave room for at most five requests (back to back there are many more)."""
    async with LoopbackServer() as server:
        result = await run_sequential(server.url, "/classify", ["{}"], duration=0.2, pause=0.05)
    assert 1 <= server.requests == result.answered <= 5
