"""Routing fidelity on live traffic: shadow dense checks and routing drift (docs/service.md).

*Shadow dense checks.* "Every gate on" is just tau 0, so the engine can run a sampled row a second
time in the same engine batch (in a forward of its own), as plain LoRA with the same weights. The
caller gets the routed answer as always; :func:`compare` turns the pair into a
:class:`ShadowOutcome` (do the labels agree, how far apart are the scores) for the metrics.
:class:`ShadowSampler` picks the rows.

*Routing drift.* A checkpoint records how often each site fired on its dev data at the served tau
(:meth:`cogalora.checkpoint.CheckpointMeta.activation_reference`). :class:`DriftWindow` keeps, per
adapter, the gate counts of about the last ``window`` rows served at that tau and reports the mean
absolute difference between live and reference rates over the adapter's routed sites: near 0 while
inputs look like the dev data, larger when they do not.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, field

from service.types import RoutingSample, RowOutput, ShadowOutcome


class ShadowSampler:
    """Decides which rows get a shadow dense check: each with probability ``fraction``.

    Seeded, so a run is reproducible; ``fraction`` 1 picks every eligible row, 0 none.
    """

    def __init__(self, fraction: float, seed: int = 0) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"shadow fraction must lie in [0, 1], got {fraction}")
        self.fraction = fraction
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def pick(self) -> bool:
        if self.fraction <= 0.0:
            return False
        if self.fraction >= 1.0:
            return True
        with self._lock:
            return self._random.random() < self.fraction


def compare(adapter: str, routed: RowOutput, dense: RowOutput) -> ShadowOutcome:
    """The shadow outcome of one row: label agreement and the score gap on the returned label (the
    routed row's most probable one; ties go to the first label, as the answer's sort does)."""
    routed_probs, dense_probs = routed.probabilities, dense.probabilities
    label = max(range(len(routed_probs)), key=routed_probs.__getitem__)
    dense_label = max(range(len(dense_probs)), key=dense_probs.__getitem__)
    return ShadowOutcome(
        adapter=adapter, agree=label == dense_label, score_difference=abs(routed_probs[label] - dense_probs[label])
    )


@dataclass
class _Window:
    reference: tuple[float, ...]
    blocks: deque[tuple[int, tuple[int, ...]]] = field(default_factory=deque)
    rows: int = 0
    active: list[int] = field(default_factory=list)


class DriftWindow:
    """Per-adapter sliding window of gate counts; ``add`` returns the drift once the window is full.

    Counts arrive per forward (a block of rows); the oldest blocks leave while the rest still holds
    ``window`` rows, so the window covers the last ``window`` rows or a block more.
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"drift window must be >= 1 row, got {window}")
        self.window = window
        self._adapters: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def add(self, sample: RoutingSample) -> float | None:
        """Take one forward's counts; the adapter's drift, or None until ``window`` rows were seen."""
        if sample.rows <= 0 or not sample.reference:
            return None
        with self._lock:
            state = self._adapters.get(sample.adapter)
            if state is None or state.reference != sample.reference:
                state = self._adapters[sample.adapter] = _Window(sample.reference, active=[0] * len(sample.reference))
            state.blocks.append((sample.rows, sample.active))
            state.rows += sample.rows
            state.active = [total + count for total, count in zip(state.active, sample.active, strict=True)]
            while state.rows - state.blocks[0][0] >= self.window:
                rows, active = state.blocks.popleft()
                state.rows -= rows
                state.active = [total - count for total, count in zip(state.active, active, strict=True)]
            if state.rows < self.window:
                return None
            return mean_absolute_difference([count / state.rows for count in state.active], state.reference)

    def forget(self, adapter: str) -> None:
        """Drop an adapter's window (it was reloaded, perhaps from another checkpoint)."""
        with self._lock:
            self._adapters.pop(adapter, None)


def mean_absolute_difference(live: list[float], reference: tuple[float, ...] | list[float]) -> float:
    """Mean over sites of ``|live - reference|``: the drift score (0 = same routing as on dev data)."""
    if len(live) != len(reference):
        raise ValueError(f"{len(live)} live rates for {len(reference)} reference rates")
    if not live:
        return 0.0
    return sum(abs(a - b) for a, b in zip(live, reference, strict=True)) / len(live)
