"""Per-forward routing metadata, built once and read by every gated site.

A forward pass through a :class:`~cogalora.model.CoGaLoRAModel` opens a :class:`RoutingState`
once: from the batch's adapter slots and thresholds and the :class:`~cogalora.slots.SlotTable` it
works out, for every site, which bank rows the batch rows use and the gate-logit threshold of each
row (like the LoRA kernel metadata of vLLM: built once per forward, not once per module). Every gated
layer reads its :class:`BankRoute` instead of taking extra arguments, so the Hugging Face forward
code stays untouched, and records its gate decisions into the state.

Gates compare logits, not probabilities: ``sigmoid(l) > tau`` is ``l > log(tau / (1 - tau))``, one
comparison per site instead of a sigmoid; probabilities are computed once, for all sites, when the
forward collects them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cogalora.attention import LengthGroups
from cogalora.gates import DEFAULT_RANK_WARMUP
from cogalora.int8 import QuantizedRows, quantize_rows
from cogalora.packing import TokenLayout
from cogalora.slots import SlotTable

ForceGates = Literal["on", "off"] | None
INF = float("inf")


def tau_logit(tau: float) -> float:
    """The logit threshold equivalent to ``p > tau`` (``-inf`` for tau 0, ``+inf`` for tau 1)."""
    if tau <= 0.0:
        return -INF
    if tau >= 1.0:
        return INF
    return math.log(tau) - math.log1p(-tau)


@dataclass(frozen=True)
class BankRoute:
    """The rows of one forward that use one bank at one site."""

    bank: int
    rows: int | Tensor
    """One bank row for every batch row (single-adapter batch), or ``[B]`` bank rows (mixed batch)."""
    threshold: Tensor
    """``[B]`` gate-logit threshold: a row's adapter runs where ``logit > threshold`` (``+inf``: not here)."""
    routed: bool
    """Whether routers must be evaluated; False when every row here is un-routed or gates are forced on."""
    present: Tensor | None
    """``[B]`` bool, the rows in this bank; ``None`` when every batch row is."""


class RoutingState:
    """What one routed forward needs to know, built once and read by every site."""

    def __init__(self, table: SlotTable) -> None:
        self.table = table
        self.active = False
        self.gate_estimator = "ste"
        """How training turns router logits into gates (``cogalora.gates``); eval always uses ``p > tau``."""
        self.gate_temperature = 1.0
        """Temperature of the ``gumbel`` estimator (annealed by the training loop)."""
        self.rank_warmup = DEFAULT_RANK_WARMUP
        """What rank-routing adapters train while gates are forced on in training (``cogalora.gates.RANK_WARMUPS``)."""
        self._reset()

    @property
    def num_sites(self) -> int:
        return self.table.num_sites

    @property
    def batch_size(self) -> int:
        """Rows of the forward (with packed tokens, not the encoder layers' leading dimension)."""
        return self._batch_size

    @property
    def layout(self) -> TokenLayout:
        """Where each row's tokens sit in the tensors the sites see (``cogalora.packing``)."""
        return self._layout

    @property
    def packing(self) -> TokenLayout | None:
        """The packed layout while a forward that packs its tokens runs, else ``None``."""
        return self._layout if self.active and self._layout.packed else None

    def _reset(self) -> None:
        self.routes: list[tuple[BankRoute, ...]] = [()] * self.table.num_sites
        self.single_slot: int | None = None
        """The slot of every row, when the batch uses one adapter."""
        self.slots: Sequence[int] = ()
        """The slot of each row (host list), as the forward was given them."""
        self.row_slots: Tensor | None = None
        self.training = False
        self._present: Tensor | None = None
        self._lengths: LengthGroups | None = None
        self._layout: TokenLayout | None = None
        self._device: torch.device | None = None
        # The last input pooled and quantized, with its results. One each, not one per site: sites that
        # read one tensor (q, k and v) run one after another, and holding every site's input to the end
        # of the forward kept each layer's activations alive (about 13 KB per token per layer in int8).
        self._pooled: tuple[Tensor, Tensor] | None = None
        self._quantized: tuple[Tensor, QuantizedRows] | None = None
        self._records: dict[int, tuple[Tensor | None, Tensor]] = {}
        self._ranks: dict[int, Tensor] = {}
        self._expected_ranks: dict[int, Tensor] = {}
        self._batch_size = 0
        self.adapter_rows = 0
        """Rows multiplied by an adapter in this forward, summed over sites."""

    @contextmanager
    def route(
        self,
        attention_mask: Tensor,
        slots: Sequence[int],
        taus: Sequence[float],
        force: ForceGates = None,
        training: bool = False,
        gather: bool = False,
        lengths: LengthGroups | None = None,
    ) -> Iterator[RoutingState]:
        """Open the state for one forward; always closed afterwards, also on error.

        ``gather``: use the per-row gathered products even when every row has the same adapter
        (the path of mixed batches; tests and benchmarks compare the two). ``lengths``: the rows
        grouped by real length (read from the mask when not given); when they say ``packed``, the
        encoder layers see the real tokens only (``cogalora.packing``).
        """
        if self.active:
            raise RuntimeError("a routed forward is already running on this model (forwards are not reentrant)")
        if len(slots) != attention_mask.shape[0] or len(taus) != attention_mask.shape[0]:
            raise ValueError(f"{len(slots)} slots and {len(taus)} taus for a batch of {attention_mask.shape[0]} rows")
        self._reset()
        device = attention_mask.device
        self._device = device
        self._lengths = LengthGroups.from_mask(attention_mask) if lengths is None else lengths
        self._layout = TokenLayout(self._lengths, attention_mask.shape[1], device)
        self._batch_size = len(slots)
        self.slots = slots
        self.training = training
        thresholds = torch.tensor([tau_logit(float(tau)) for tau in taus], dtype=torch.float32, device=device)
        distinct = set(slots)
        if len(distinct) == 1 and not gather:
            self.single_slot = next(iter(distinct))
            self._route_single(self.single_slot, thresholds, force)
        else:
            if training and len(distinct) > 1:
                raise ValueError("training runs one adapter per forward; got rows of several slots")
            self.row_slots = torch.tensor(list(slots), dtype=torch.long, device=device)
            self._route_mixed(self.row_slots, thresholds, force)
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            self._pooled = None
            self._quantized = None
            self._lengths = None
            self._layout = None

    def _route_single(self, slot: int, thresholds: Tensor, force: ForceGates) -> None:
        if force == "off":
            return
        always_on = torch.full_like(thresholds, -INF)
        routes: list[tuple[BankRoute, ...]] = []
        for entry in self.table.entries(slot):
            if entry is None:
                routes.append(())
                continue
            routed = entry.routed and force is None
            routes.append((BankRoute(entry.bank, entry.row, thresholds if routed else always_on, routed, None),))
        self.routes = routes

    def _route_mixed(self, slots: Tensor, thresholds: Tensor, force: ForceGates) -> None:
        if force == "off":
            return
        banks, rows, routed = self.table.gather(slots)
        present = banks >= 0
        self._present = present
        if force == "on":
            routed = torch.zeros_like(routed)
        threshold = torch.where(routed, thresholds, -INF).masked_fill_(~present, INF)
        banks_host = banks.tolist()
        routed_host = routed.any(dim=1).tolist()
        per_site = zip(banks_host, routed_host, rows.unbind(0), threshold.unbind(0), present.unbind(0), strict=True)
        routes: list[tuple[BankRoute, ...]] = []
        for site, (site_banks, site_routed, site_rows, site_threshold, site_present) in enumerate(per_site):
            distinct = sorted(set(site_banks) - {-1})
            everywhere = -1 not in site_banks
            if len(distinct) <= 1:
                routes.append(
                    tuple(
                        BankRoute(bank, site_rows, site_threshold, site_routed, None if everywhere else site_present)
                        for bank in distinct
                    )
                )
                continue
            # Rows of this site live in banks of different ranks: one route per bank.
            bank_routes = []
            for bank in distinct:
                member = banks[site] == bank
                bank_routes.append(
                    BankRoute(bank, site_rows, site_threshold.masked_fill(~member, INF), site_routed, member)
                )
            routes.append(tuple(bank_routes))
        self.routes = routes

    # ---- what sites call ----------------------------------------------------------------------

    def pooled(self, x: Tensor) -> Tensor:
        """Mean of ``x`` ([B, T, d], or [1, N, d] packed) over each row's real tokens, in float32, once per
        tensor read by consecutive sites.

        Each row's tokens are added in token order into a row of its own (``TokenLayout.row_sums``), so a
        row's mean is the same sum of the same numbers in any batch (a reduction over the padded width
        would group the additions by the width, which depends on the batch-mates).
        """
        if self._pooled is not None and self._pooled[0] is x:
            return self._pooled[1]
        pooled = self._layout.row_means(x)
        self._pooled = (x, pooled)
        return pooled

    def quantized(self, x: Tensor) -> QuantizedRows:
        """``x`` ([B, T, d], or [1, N, d] packed) as int8 codes per token (``cogalora.int8``), once per
        tensor read by consecutive sites."""
        if self._quantized is not None and self._quantized[0] is x:
            return self._quantized[1]
        rows = quantize_rows(x.reshape(-1, x.shape[-1]))
        self._quantized = (x, rows)
        return rows

    def record(
        self,
        site: int,
        values: Tensor | None,
        gates: Tensor,
        present: Tensor | None = None,
        ranks: Tensor | None = None,
        expected_ranks: Tensor | None = None,
    ) -> None:
        """A site's gate decisions: ``values`` are logits (eval) or probabilities (training), ``None``
        when no router ran (every row here always on); ``present`` limits them to one bank's rows.

        ``ranks`` ([B] long): the rank each row used (0 where off); ``expected_ranks`` (training, with
        grad): each row's expected rank under its router, ``p * E[k]``, for the rank penalty.
        """
        if ranks is not None:
            old_ranks = self._ranks.get(site)
            if old_ranks is not None and present is not None:
                ranks = torch.where(present, ranks, old_ranks)
            self._ranks[site] = ranks
        if expected_ranks is not None:
            self._expected_ranks[site] = expected_ranks
        previous = self._records.get(site)
        if previous is not None and present is not None:
            old_values, old_gates = previous
            if values is None:
                values = gates.to(torch.float32) if self.training else torch.where(gates, INF, -INF)
            if old_values is None:
                old_values = old_gates.to(torch.float32) if self.training else torch.where(old_gates, INF, -INF)
            values, gates = torch.where(present, values, old_values), gates | old_gates
        self._records[site] = (values, gates)

    def collect_ranks(self) -> tuple[Tensor, Tensor | None]:
        """The rank each row used at each site (``[B, num_sites]`` long, 0 where off), and in training
        the expected ranks (``[B, num_sites]``, with grad; ``None`` in eval)."""
        size = self._batch_size
        device = self._device
        zeros = torch.zeros(size, dtype=torch.long, device=device)
        ranks = [self._ranks.get(site, zeros) for site in range(self.num_sites)]
        used = torch.stack(ranks, dim=1) if ranks else torch.zeros(size, 0, dtype=torch.long, device=device)
        if not self.training:
            return used, None
        expected = [self._expected_ranks.get(site, zeros.float()) for site in range(self.num_sites)]
        return used, torch.stack(expected, dim=1) if expected else used.float()

    def collect(self) -> tuple[Tensor, Tensor]:
        """Gate probabilities (with grad in training) and hard gates, both ``[B, num_sites]``."""
        size = self._batch_size
        device = self._device
        if self.num_sites == 0:
            return torch.zeros(size, 0, device=device), torch.zeros(size, 0, dtype=torch.bool, device=device)
        off = torch.zeros(size, dtype=torch.bool, device=device)
        # Sites without a record have no adapter for any row: probability 0 (logit -inf).
        absent = torch.zeros(size, device=device) if self.training else torch.full((size,), -INF, device=device)
        values, gates = [], []
        for site in range(self.num_sites):
            record = self._records.get(site)
            if record is None:
                values.append(absent)
                gates.append(off)
                continue
            value, gate = record
            if value is None:  # no router ran: every present row is on
                value = gate.to(torch.float32) if self.training else torch.where(gate, INF, -INF)
            values.append(value)
            gates.append(gate)
        gate_matrix = torch.stack(gates, dim=1)
        value_matrix = torch.stack(values, dim=1)
        if self.training:
            return value_matrix, gate_matrix
        probs = torch.sigmoid(value_matrix)
        if self._present is not None:  # mixed batch: logits of rows without an adapter here are meaningless
            probs = probs * self._present.t()
        return probs, gate_matrix
