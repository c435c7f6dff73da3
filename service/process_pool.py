"""Several engine processes behind one transport: requests go to the least busy, admin changes to all.

On CPUs, two forwards on two threads of one process run far below twice one forward: a forward of a
small batch spends much of its time in Python (module calls, routing), and the two threads take
turns at one interpreter lock (measured on 2 cores, MiniLM int8, batches of 8: two threads 1.2x one
thread, two processes 1.9x). So the API process starts one engine process per lane
(``Settings.resolved_engine_processes``), each a :class:`~service.process_transport.ProcessTransport`
with its own batcher and model.

- A request goes to the live process holding the fewest rows; while one process restarts, the
  others serve (the service is unready only when none is up).
- An admin change (``load``, ``unload``) is made in every live process; a process that restarts
  meanwhile reads the model directory again, so it comes back with the same adapters on disk.
- The resident adapters reported to the API process are those resident in any process.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from service.errors import NotReadyError
from service.process_transport import ProcessTransport
from service.types import BatchStats, RowOutput, TokenizedRequest


class _MemberEvents:
    """One process's engine events, merged into the pool's view of the resident adapters."""

    def __init__(self, pool: ProcessPool, index: int) -> None:
        self.pool = pool
        self.index = index

    def on_batch(self, stats: BatchStats) -> None:
        self.pool.events.on_batch(stats)

    def on_adapter_loaded(self, name: str, seconds: float) -> None:
        if self.pool._set_resident(self.index, name, True):
            self.pool.events.on_adapter_loaded(name, seconds)

    def on_adapter_evicted(self, name: str) -> None:
        if self.pool._set_resident(self.index, name, False):
            self.pool.events.on_adapter_evicted(name)

    def on_ready(self, loaded: list[str], unavailable: dict[str, str]) -> None:
        self.pool._member_ready(self.index, loaded, unavailable)


class ProcessPool:
    """``count`` engine processes as one transport (the :class:`~service.engine_client.Transport` protocol)."""

    def __init__(self, count: int, settings_payload: dict[str, Any], events: Any, on_ready: Any) -> None:
        """``events`` and ``on_ready`` as for :class:`ProcessTransport`; ``on_ready`` gets the adapters
        resident in any process whenever one (re)starts, and those that one could not load."""
        self.events = events
        self.on_ready = on_ready
        self._resident: list[set[str]] = [set() for _ in range(count)]
        self._holders: Counter[str] = Counter()
        self._rows = [0] * count
        self.members: list[ProcessTransport] = []
        for index in range(count):
            member_events = _MemberEvents(self, index)
            self.members.append(ProcessTransport(settings_payload, member_events, member_events.on_ready))

    @property
    def up(self) -> bool:
        return any(member.up for member in self.members)

    @property
    def queue_depth(self) -> int:
        return sum(member.queue_depth for member in self.members)

    @property
    def pids(self) -> list[int | None]:
        return [member.pid for member in self.members]

    async def start(self) -> None:
        """Start every process (at once); if one cannot start, stop the others and raise its error."""
        outcomes = await asyncio.gather(*(member.start() for member in self.members), return_exceptions=True)
        failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failed:
            await self.stop()
            raise failed[0]

    async def stop(self) -> None:
        await asyncio.gather(*(member.stop() for member in self.members))

    async def classify(self, request: TokenizedRequest) -> list[RowOutput]:
        live = [index for index, member in enumerate(self.members) if member.up]
        if not live:
            raise NotReadyError("the engine is restarting; retry shortly", retry_after=1.0)
        index = min(live, key=lambda i: self._rows[i])
        rows = len(request.ids)
        self._rows[index] += rows
        try:
            return await self.members[index].classify(request)
        finally:
            self._rows[index] -= rows

    async def call(self, method: str, *args: Any) -> Any:
        """``method`` in every live process; the first error is raised (after all have answered)."""
        live = [member for member in self.members if member.up]
        if not live:
            raise NotReadyError("the engine is restarting; retry shortly", retry_after=1.0)
        outcomes = await asyncio.gather(*(member.call(method, *args) for member in live), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if method == "unload":  # an unload is not an eviction: the engine sends no event for it
            for index in range(len(self.members)):
                self._set_resident(index, args[0], False)
        return outcomes[0]

    # ---- resident adapters --------------------------------------------------------------------

    def _set_resident(self, index: int, name: str, resident: bool) -> bool:
        """Record that process ``index`` holds ``name`` (or not); True when the union changed."""
        holders = self._resident[index]
        if resident == (name in holders):
            return False
        if resident:
            holders.add(name)
            self._holders[name] += 1
            return self._holders[name] == 1
        holders.discard(name)
        self._holders[name] -= 1
        if self._holders[name] == 0:
            del self._holders[name]
            return True
        return False

    def _member_ready(self, index: int, loaded: list[str], unavailable: dict[str, str]) -> None:
        for name in list(self._resident[index]):
            self._set_resident(index, name, False)
        for name in loaded:
            self._set_resident(index, name, True)
        self.on_ready(sorted(self._holders), unavailable)
