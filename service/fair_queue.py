"""The batcher's waiting rows, shared fairly between clients.

Each client (``ClassifyRequest.client``, the key id) has its own first-in, first-out queue of
requests, and batches take one row of each client in turn (the next batch goes on where the last one
stopped), so a client with a thousand rows waiting does not delay another client's next row past the
next batch. When room is needed, the newest request not yet started of the client holding most rows
gives way (longest queue drop). With one client this is plain first in, first out. Not thread-safe:
the batcher uses it from its event loop only.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from service.engine import PreparedRow
from service.errors import ServiceError
from service.types import RowOutput


@dataclass(eq=False)
class Pending:
    """One queued request: its rows, how many are still queued, its answers so far."""

    rows: list[PreparedRow]
    future: asyncio.Future
    enqueued_at: float
    client: str = ""
    next_row: int = 0
    """Rows before this index have been taken into a batch."""
    results: list[RowOutput | ServiceError | None] = field(default_factory=list)
    remaining: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.rows)
        self.remaining = len(self.rows)


#: A row of a batch: the request it belongs to, its index there, and the row.
TakenRow = tuple[Pending, int, PreparedRow]


class FairQueue:
    """Waiting requests per client, and the rows each client holds (waiting, or admitted and not queued yet)."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Pending]] = OrderedDict()
        """Waiting requests per client, first in first out; the order of clients is the order of turns."""
        self._rows_by_client: Counter[str] = Counter()
        self.queued_rows = 0
        """Rows waiting for a batch."""

    def __bool__(self) -> bool:
        return bool(self._queues)

    def hold(self, client: str, count: int) -> None:
        """Count ``count`` admitted rows as ``client``'s (before they are queued)."""
        self._rows_by_client[client] += count

    def forget(self, client: str, count: int) -> None:
        """Stop counting ``count`` rows as ``client``'s (answered, abandoned or taken into a batch)."""
        self._rows_by_client[client] -= count
        if self._rows_by_client[client] <= 0:
            del self._rows_by_client[client]

    def push(self, pending: Pending) -> None:
        """Queue a request whose rows its client already holds."""
        self._queues.setdefault(pending.client, deque()).append(pending)
        self.queued_rows += len(pending.rows)

    def oldest(self) -> float:
        """When the oldest waiting request was queued (the queue is not empty)."""
        return min(queue[0].enqueued_at for queue in self._queues.values())

    def displaceable(self, client: str, count: int) -> Pending | None:
        """The newest not-yet-started request of the client holding most rows, if it holds more than ``client``
        would with ``count`` more."""
        others = [other for other in self._queues if other != client]
        if not others:
            return None
        longest = max(others, key=self._rows_by_client.__getitem__)
        if self._rows_by_client[longest] <= self._rows_by_client[client] + count:
            return None
        return next((pending for pending in reversed(self._queues[longest]) if pending.next_row == 0), None)

    def withdraw(self, pending: Pending) -> None:
        """Take ``pending`` out if it still waits, with its rows not taken yet."""
        queue = self._queues.get(pending.client)
        if queue is not None and pending in queue:
            self.unqueue(pending)

    def unqueue(self, pending: Pending) -> None:
        """Take a waiting request out of its client's queue, with its rows not taken yet."""
        queue = self._queues[pending.client]
        queue.remove(pending)
        if not queue:
            del self._queues[pending.client]
        untaken = len(pending.rows) - pending.next_row
        self.queued_rows -= untaken
        self.forget(pending.client, untaken)

    def take_order(self) -> Iterator[TakenRow]:
        """Waiting rows in the order batches take them: one row of each client in turn, first in first out
        within a client."""
        turns = [self._waiting_rows(queue) for queue in self._queues.values()]
        while turns:
            still_waiting = []
            for rows in turns:
                item = next(rows, None)
                if item is not None:
                    yield item
                    still_waiting.append(rows)
            turns = still_waiting

    @staticmethod
    def _waiting_rows(queue: deque[Pending]) -> Iterator[TakenRow]:
        for pending in queue:
            for index in range(pending.next_row, len(pending.rows)):
                yield pending, index, pending.rows[index]

    def take_batch(self, fits: Callable[[int, int], bool], limit: int) -> list[TakenRow]:
        """The next batch: rows in the clients' turn, as many as ``fits(rows, longest)`` allows, at most ``limit``."""
        taken: list[TakenRow] = []
        longest = 0
        for pending, index, row in self.take_order():
            if taken and not fits(len(taken) + 1, max(longest, row.tokens)):
                break
            if len(taken) == limit:
                break
            taken.append((pending, index, row))
            longest = max(longest, row.tokens)
        for pending, _, _ in taken:  # a request's rows are taken in order, so next_row just advances
            pending.next_row += 1
            self.queued_rows -= 1
            self.forget(pending.client, 1)
        if taken:  # the next batch goes on with the client after the last one served
            clients = list(self._queues)
            for client in clients[: clients.index(taken[-1][0].client) + 1]:
                self._queues.move_to_end(client)
        for client in list(self._queues):
            queue = self._queues[client]
            while queue and queue[0].next_row == len(queue[0].rows):
                queue.popleft()
            if not queue:
                del self._queues[client]
        return taken
