"""What the console's live panel shows (``GET /console/stats``), read from the service's own metrics.

Totals since start come straight from the Prometheus registry. Rates and latency percentiles cover a
recent window: each call keeps a copy of the registry's samples (at most one a second, for a minute)
and differences the current samples against the newest copy at least ``window_s`` old. So every
viewer sees the same numbers, and nothing runs between calls.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry

from service import metric_definitions as defined
from service.lifecycle import Service
from service.metrics import UNKNOWN_ADAPTER
from service.schemas import AdapterLiveStats, LiveStatsResponse

#: Sample values by (name, sorted label pairs), e.g. ("cogalora_inputs_total", (("adapter", "sst2"),)).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

DEFAULT_WINDOW_S = 10.0
_SNAPSHOT_EVERY_S = 1.0
_KEEP_S = 60.0


def read_samples(registry: CollectorRegistry) -> Samples:
    """Every sample of ``registry`` now."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


def _matching(samples: Samples, name: str, labels: dict[str, str]) -> Iterator[tuple[dict[str, str], float]]:
    wanted = set(labels.items())
    for (sample, pairs), value in samples.items():
        if sample == name and wanted <= set(pairs):
            yield dict(pairs), value


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(value for _, value in _matching(samples, name, labels))


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    """The samples named ``name`` whose labels include ``labels``, summed per value of ``label``."""
    sums: dict[str, float] = {}
    for pairs, value in _matching(samples, name, labels):
        if label in pairs:
            sums[pairs[label]] = sums.get(pairs[label], 0.0) + value
    return sums


def histogram_quantile(quantile: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's estimate from cumulative ``{upper bound: count}`` buckets (linear inside a bucket).

    None without observations; a quantile in the ``+Inf`` bucket reads as the highest finite bound.
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = quantile * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return bound if inside <= 0 else lower + (bound - lower) * (rank - below) / inside
        lower, below = bound, count
    return lower


class LiveStats:
    """Summaries of one service's metrics; keeps the recent copies the window rates need."""

    def __init__(
        self, service: Service, window_s: float = DEFAULT_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.service = service
        self.window_s = window_s
        self.clock = clock
        self.started = clock()
        self._history: deque[tuple[float, Samples]] = deque()

    def summary(self) -> LiveStatsResponse:
        now = self.clock()
        samples = read_samples(self.service.metrics.registry)
        since, before = self._baseline(now)
        if not self._history or now - self._history[-1][0] >= _SNAPSHOT_EVERY_S:
            self._history.append((now, samples))
        window = max(now - since, 1e-9)
        buckets = _latency_buckets(samples)
        old_buckets = _latency_buckets(before)
        recent = {bound: count - old_buckets.get(bound, 0.0) for bound, count in buckets.items()}
        p50, p99 = (histogram_quantile(q, recent) for q in (0.5, 0.99))
        requests = total(samples, defined.REQUESTS.series)
        codes = by_label(samples, defined.REQUESTS.series, "code")
        settings = self.service.settings
        return LiveStatsResponse(
            uptime_s=now - self.started,
            window_s=window,
            requests_total=round(requests),
            errors_total=round(sum(count for code, count in codes.items() if code.isdigit() and int(code) >= 400)),
            requests_per_s=(requests - total(before, defined.REQUESTS.series)) / window,
            latency_p50_ms=None if p50 is None else p50 * 1000,
            latency_p99_ms=None if p99 is None else p99 * 1000,
            inflight=round(total(samples, defined.INFLIGHT.series)),
            queue_depth=round(total(samples, defined.QUEUE_DEPTH.series)),
            adapters_loaded=round(total(samples, defined.ADAPTERS_LOADED.series)),
            adapters_available=round(total(samples, defined.ADAPTERS_AVAILABLE.series)),
            shadow_fraction=settings.shadow_fraction,
            drift_window=settings.drift_window,
            adapters=_per_adapter(samples),
        )

    def _baseline(self, now: float) -> tuple[float, Samples]:
        """The copy to difference against: the newest one at least ``window_s`` old, else the oldest
        (else the start, when every counter was 0)."""
        while self._history and now - self._history[0][0] > _KEEP_S:
            self._history.popleft()
        older = [entry for entry in self._history if now - entry[0] >= self.window_s]
        if older:
            return older[-1]
        if self._history and self._history[0][0] < now:
            return self._history[0]
        return self.started, {}


def _latency_buckets(samples: Samples) -> dict[float, float]:
    return {float(bound): count for bound, count in by_label(samples, defined.REQUEST_DURATION.bucket, "le").items()}


def _per_adapter(samples: Samples) -> dict[str, AdapterLiveStats]:
    inputs = by_label(samples, defined.INPUTS.series, "adapter")
    active_sum = by_label(samples, defined.ACTIVE_ADAPTERS.sum, "adapter")
    active_count = by_label(samples, defined.ACTIVE_ADAPTERS.count, "adapter")
    rank_sum = by_label(samples, defined.ACTIVE_RANK.sum, "adapter")
    rank_count = by_label(samples, defined.ACTIVE_RANK.count, "adapter")
    flops = by_label(samples, defined.ADAPTER_FLOPS.series, "adapter")
    saved = by_label(samples, defined.ADAPTER_FLOPS_SAVED.series, "adapter")
    agree = by_label(samples, defined.SHADOW_ROWS.series, "adapter", agreement="agree")
    checks = by_label(samples, defined.SHADOW_ROWS.series, "adapter")
    drift = by_label(samples, defined.ROUTING_DRIFT.series, "adapter")
    names = sorted((set(inputs) | set(checks) | set(drift)) - {UNKNOWN_ADAPTER})
    return {
        name: AdapterLiveStats(
            inputs=round(inputs.get(name, 0.0)),
            mean_active_adapters=_ratio(active_sum.get(name, 0.0), active_count.get(name, 0.0)),
            mean_active_rank=_ratio(rank_sum.get(name, 0.0), rank_count.get(name, 0.0)),
            adapter_flops=flops.get(name, 0.0),
            adapter_flops_saved=saved.get(name, 0.0),
            shadow_checks=round(checks.get(name, 0.0)),
            shadow_agreement=_ratio(agree.get(name, 0.0), checks.get(name, 0.0)),
            routing_drift=drift.get(name),
        )
        for name in names
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None
