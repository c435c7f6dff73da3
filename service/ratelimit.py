"""Per-key rate limits: two token buckets per key id, one for requests and one for input rows.

A bucket holds up to ``rate x burst_seconds`` tokens (at least one) and refills at ``rate`` per
second. A request takes one request token when it arrives; a classification takes one row token
per input once its inputs are counted. A cost larger than the bucket (a 64-input request against
20 rows/s) is admitted when the bucket is full and leaves it in debt, so the long-run rate holds
without making large requests impossible. A refusal says how long until the bucket holds enough:
that is the ``Retry-After`` of the 429.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import RateLimitedError


@dataclass(frozen=True)
class RateLimits:
    """A key's rates (``None``: unlimited) and how many seconds of them it may spend at once."""

    requests_per_second: float | None = None
    rows_per_second: float | None = None
    burst_seconds: float = 1.0


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` saved; ``take`` answers how long to wait (0: taken)."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._updated = now

    def take(self, cost: float, now: float) -> float:
        """Take ``cost`` tokens and return 0, or take nothing and return the seconds until it would succeed."""
        self.tokens = min(self.capacity, self.tokens + (now - self._updated) * self.rate)
        self._updated = now
        needed = min(cost, self.capacity)
        if self.tokens >= needed:
            self.tokens -= cost
            return 0.0
        return (needed - self.tokens) / self.rate


def _bucket(rate: float | None, burst_seconds: float, now: float) -> TokenBucket | None:
    return None if rate is None else TokenBucket(rate, max(1.0, rate * burst_seconds), now)


class RateLimiter:
    """The buckets of every rate-limited key id; a key's buckets are rebuilt when its limits change."""

    def __init__(
        self,
        on_limited: Callable[[str, str], None] = lambda key_id, limit: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_limited = on_limited
        """Called with (key id, ``"requests"`` or ``"rows"``) for every refusal (the metric)."""
        self._clock = clock
        self._buckets: dict[str, tuple[RateLimits, TokenBucket | None, TokenBucket | None]] = {}
        self._lock = threading.Lock()

    def admit_request(self, key_id: str, limits: RateLimits | None) -> None:
        """Take one request token of ``key_id``; raises RateLimitedError when there is none."""
        self._take(key_id, limits, 0, 1, "requests")

    def admit_rows(self, key_id: str, limits: RateLimits | None, rows: int) -> None:
        """Take ``rows`` row tokens of ``key_id``; raises RateLimitedError when there are too few."""
        self._take(key_id, limits, 1, rows, "rows")

    def forget_except(self, key_ids: set[str]) -> None:
        """Drop the buckets of keys that no longer exist (after a key file reload)."""
        with self._lock:
            for key_id in set(self._buckets) - key_ids:
                del self._buckets[key_id]

    def _take(self, key_id: str, limits: RateLimits | None, which: int, cost: int, limit: str) -> None:
        if limits is None or (limits.requests_per_second is None and limits.rows_per_second is None):
            return
        with self._lock:
            now = self._clock()
            known = self._buckets.get(key_id)
            if known is None or known[0] != limits:
                known = (
                    limits,
                    _bucket(limits.requests_per_second, limits.burst_seconds, now),
                    _bucket(limits.rows_per_second, limits.burst_seconds, now),
                )
                self._buckets[key_id] = known
            bucket = known[1 + which]
            wait = 0.0 if bucket is None else bucket.take(cost, now)
        if wait > 0:
            self.on_limited(key_id, limit)
            per_second = limits.requests_per_second if limit == "requests" else limits.rows_per_second
            raise RateLimitedError(
                f"rate limit of this key exceeded ({per_second:g} {limit} per second); retry later", retry_after=wait
            )
