"""Where each adapter slot lives at each site: which bank, which row, whether it is routed.

A *slot* is an adapter loaded into a :class:`~cogalora.model.CoGaLoRAModel` (training uses slot 0;
the serving repository assigns slots). The table is kept twice: as host lists, for decisions made
once per forward (is the whole batch on one adapter? which sites have any row at all?), and as
``[sites, slots]`` tensors, so a mixed batch gets every site's per-row bank rows and thresholds from
one gather per forward instead of Python work at every site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class SlotEntry:
    """One adapter at one site."""

    bank: int
    """Index of the site's bank (one per rank)."""
    row: int
    """Row of that bank holding the adapter."""
    routed: bool
    """Whether a router gates it (False: plain LoRA or folded GaLoRA, always on)."""


class SlotTable(nn.Module):
    """Slot -> (bank, row, routed) for every site, on the host and as device tensors (buffers, so they
    follow the model to its device; not persistent: a checkpoint never stores them)."""

    def __init__(self, num_sites: int, capacity: int = 1) -> None:
        super().__init__()
        self.num_sites = num_sites
        self._entries: list[list[SlotEntry | None]] = [[None] * num_sites for _ in range(capacity)]
        #: ``[sites, slots]``: bank index, -1 where the slot has no adapter at the site.
        self.register_buffer("bank", torch.full((num_sites, capacity), -1, dtype=torch.long), persistent=False)
        #: ``[sites, slots]``: bank row (0 where absent, so it is always a valid gather index).
        self.register_buffer("row", torch.zeros((num_sites, capacity), dtype=torch.long), persistent=False)
        self.register_buffer("routed", torch.zeros((num_sites, capacity), dtype=torch.bool), persistent=False)

    @property
    def capacity(self) -> int:
        return len(self._entries)

    def entries(self, slot: int) -> list[SlotEntry | None]:
        """The slot's entry at every site (``None`` where it has no adapter)."""
        if not 0 <= slot < self.capacity:
            return [None] * self.num_sites
        return self._entries[slot]

    def entry(self, slot: int, site: int) -> SlotEntry | None:
        return self.entries(slot)[site]

    def set(self, slot: int, site: int, entry: SlotEntry | None) -> None:
        if slot >= self.capacity:
            self._grow(max(slot + 1, 2 * self.capacity))
        self._entries[slot][site] = entry
        self.bank[site, slot] = -1 if entry is None else entry.bank
        self.row[site, slot] = 0 if entry is None else entry.row
        self.routed[site, slot] = entry is not None and entry.routed

    def _grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        self._entries += [[None] * self.num_sites for _ in range(extra)]
        pad = (0, extra)
        self.bank = torch.nn.functional.pad(self.bank, pad, value=-1)
        self.row = torch.nn.functional.pad(self.row, pad, value=0)
        self.routed = torch.nn.functional.pad(self.routed, pad, value=False)

    def gather(self, slots: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(bank, row, routed)``, each ``[sites, B]``, for a batch whose rows use ``slots`` ([B])."""
        return self.bank[:, slots], self.row[:, slots], self.routed[:, slots]
