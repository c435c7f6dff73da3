"""Per-forward routing metadata shared by every gated layer of one model.

A forward pass through a :class:`~cogalora.model.CoGaLoRAModel` opens a
:class:`RoutingState` once: which adapter slot each row belongs to, each row's
threshold, and the attention mask that routers need to pool over real tokens.
Every gated layer reads it instead of taking extra arguments, so the Hugging
Face forward code stays untouched, and records its gate decisions into it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor

ForceGates = Literal["on", "off"] | None


class RoutingState:
    """What one routed forward needs to know, built once and read by every site."""

    def __init__(self, num_sites: int) -> None:
        self.num_sites = num_sites
        self.active = False
        self._reset()

    def _reset(self) -> None:
        self.row_slot: Tensor | None = None
        self.row_tau: Tensor | None = None
        self.force: ForceGates = None
        self.batch_slots: list[int] = []
        """Distinct slots among the rows, ascending (host list, built once per forward)."""
        self._constants: dict[tuple[int, torch.dtype], Tensor] = {}
        self._mean_weights: Tensor | None = None
        self._pooled: dict[int, tuple[Tensor, Tensor]] = {}
        self._probs: dict[int, Tensor] = {}
        self._gates: dict[int, Tensor] = {}
        self.adapter_rows = 0

    @contextmanager
    def route(
        self,
        attention_mask: Tensor,
        row_slot: Tensor,
        row_tau: Tensor,
        force: ForceGates = None,
    ) -> Iterator[RoutingState]:
        """Open the state for one forward; always closed afterwards, also on error."""
        if self.active:
            raise RuntimeError("a routed forward is already running on this model (forwards are not reentrant)")
        self._reset()
        mask = attention_mask.to(torch.float32)
        # Mean-pooling weights: 1/len on real tokens, 0 on padding. One bmm per distinct input then
        # gives the masked mean, and padding contributes exact zeros (batch invariance).
        self._mean_weights = (mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)).unsqueeze(1)
        self.row_slot = row_slot
        self.row_tau = row_tau
        self.batch_slots = torch.unique(row_slot).tolist()
        self._batch_size = row_slot.shape[0]
        self._device = row_slot.device
        self.force = force
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            self._pooled.clear()
            self._constants.clear()
            self._mean_weights = None

    def pooled(self, x: Tensor) -> Tensor:
        """Masked mean of ``x`` ([B, T, d]) over real tokens, computed once per distinct tensor."""
        cached = self._pooled.get(id(x))
        if cached is not None and cached[0] is x:
            return cached[1]
        weights = self._mean_weights.to(dtype=x.dtype, device=x.device)
        pooled = torch.bmm(weights, x).squeeze(1)
        # Keep a reference to x so that its id cannot be reused by another tensor in this forward.
        self._pooled[id(x)] = (x, pooled)
        return pooled

    def zeros(self, dtype: torch.dtype) -> Tensor:
        """A ``[B]`` zero vector, shared by every site of this forward (treat as read-only)."""
        return self._constant(0, dtype)

    def ones(self, dtype: torch.dtype) -> Tensor:
        """A ``[B]`` vector of ones, shared by every site of this forward (treat as read-only)."""
        return self._constant(1, dtype)

    def _constant(self, value: int, dtype: torch.dtype) -> Tensor:
        key = (value, dtype)
        tensor = self._constants.get(key)
        if tensor is None:
            tensor = torch.full((self._batch_size,), value, dtype=dtype, device=self._device)
            self._constants[key] = tensor
        return tensor

    def record(self, site_index: int, probs: Tensor, gates: Tensor) -> None:
        self._probs[site_index] = probs
        self._gates[site_index] = gates

    def collect(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Gate probabilities (with grad in training) and hard gates, both ``[B, num_sites]``."""
        zeros = torch.zeros(batch_size, device=device)
        probs = [self._probs.get(i, zeros) for i in range(self.num_sites)]
        gates = [self._gates.get(i, zeros.bool()) for i in range(self.num_sites)]
        if not probs:
            return zeros.new_zeros(batch_size, 0), zeros.new_zeros(batch_size, 0, dtype=torch.bool)
        return torch.stack(probs, dim=1), torch.stack(gates, dim=1)
