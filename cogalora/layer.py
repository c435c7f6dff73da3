"""Gated LoRA layers over one frozen Linear, holding any number of adapters.

Training uses one adapter (slot 0); the serving engine loads many adapters into one shared base
model. Both run this same code, so train/serve equivalence holds by construction. Adapters live in
:class:`~cogalora.bank.AdapterBank` objects (one per rank); which adapter a batch row uses, and its
threshold, come from the forward's :class:`~cogalora.routing.RoutingState`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cogalora.architectures import Site
from cogalora.bank import AdapterBank, _grown
from cogalora.gates import training_gates
from cogalora.int8 import Int8Linear, quantize_rows
from cogalora.routing import BankRoute, RoutingState
from cogalora.variants import PLAIN, AdapterVariant

#: Widest stacked adapter product of a mixed int8 batch, in rank components (``adapters x rank``): every
#: token multiplies the whole stack, so beyond some width the wasted products cost more than the
#: kernels, gathers and scatters that stacking saves.
STACKED_RANK = 64


class GatedLoraLinear(nn.Module):
    """``W0 x + g(x) * B A x * (alpha / r)`` for the adapter of each row.

    ``g`` is the row's gate at this site: its router's hard decision ``p > tau`` in eval, a
    straight-through Bernoulli sample in training, 1 for un-routed (plain LoRA) adapters, 0 where
    the row's adapter has nothing here. In eval, rows whose gate is off are never multiplied; a
    batch on one adapter multiplies its active rows in two plain products, a mixed batch in two
    batched products over per-row gathered matrices (a constant number of kernels, whatever the
    number of adapters).
    """

    def __init__(self, base: nn.Linear | Int8Linear, site: Site, routing: RoutingState, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.site = site
        # A plain attribute, not a submodule: the state is shared by every site of the model.
        self.routing = routing
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.banks = nn.ModuleList()
        #: GaLoRA's learnable scalar gate of the training adapter; only while training GaLoRA.
        self.galora_gate: nn.Parameter | None = None

    # ---- banks ----------------------------------------------------------------------------

    def bank_for(
        self, rank: int, router_hidden: int, fold_scaling: bool = True, variant: AdapterVariant = PLAIN
    ) -> int:
        """Index of the bank for adapters of ``rank`` and ``variant`` (created on first use)."""
        for index, bank in enumerate(self.banks):
            if (bank.rank, bank.fold_scaling, bank.variant) == (rank, fold_scaling, variant):
                return index
        self.banks.append(_new_bank(self.base, rank, router_hidden, variant=variant, fold_scaling=fold_scaling))
        return len(self.banks) - 1

    @property
    def integer(self) -> bool:
        """Whether the base product (and so every adapter product here) is an exact integer product."""
        return isinstance(self.base, Int8Linear)

    @torch.no_grad()
    def use_integer_products(self) -> None:
        """Serve with exact integer products: the base Linear becomes an :class:`Int8Linear`, every bank
        keeps int8 codes of its adapters."""
        if not self.integer:
            self.base = Int8Linear(self.base)
        for bank in self.banks:
            if bank.rows_used or bank.fold_scaling:  # an empty training bank is never routed to: left as is
                bank.use_integer_products()

    def enable_galora_gate(self) -> None:
        self.galora_gate = nn.Parameter(torch.ones((), device=self.base.weight.device))

    # ---- forward --------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        state = self.routing
        if self.integer:
            # q, k and v read one tensor: the routing state quantizes it once for the three.
            rows = state.quantized(x) if state.active else quantize_rows(x.reshape(-1, x.shape[-1]))
            out = self.base.forward_quantized(rows, x.shape[:-1])
        else:
            out = self.base(x)
        if not state.active:
            return out
        routes = state.routes[self.site.index]
        if not routes:
            return out
        if state.training:
            return self._forward_train(x, out, routes)
        for route in routes:
            self._forward_route(x, out, route)
        return out

    def _forward_route(self, x: Tensor, out: Tensor, route: BankRoute) -> None:
        """Hard gates (and ranks) for the rows of one bank; ``B A x`` is added to ``out`` for active rows.

        When the bank's variant picks a rank per row, the rows are grouped by it: each group runs the
        products at its own rank (the first k rows of ``A``, columns of ``B``), so the arithmetic
        executed is the rank each row uses, as the FLOP count says.
        """
        state = self.routing
        bank = self.banks[route.bank]
        if route.routed:
            logits, chosen = self._route_scores(bank, state.pooled(x), route)
            active = logits > route.threshold
        else:
            logits, chosen = None, None
            active = route.threshold < float("inf")
        ranks = torch.where(active, bank.rank if chosen is None else chosen, 0)
        if chosen is None:
            state.record(self.site.index, logits, active, route.present, ranks)
            self._add_active(x, out, route, active, None)
            return
        state.record(self.site.index, logits, ranks > 0, route.present, ranks)
        for rank in torch.unique(ranks).tolist():
            if rank > 0:
                self._add_active(x, out, route, ranks == rank, rank)

    @staticmethod
    def _route_scores(bank: AdapterBank, pooled: Tensor, route: BankRoute) -> tuple[Tensor, Tensor | None]:
        """Gate logits and chosen ranks of the route's rows; rows of other banks (``present`` false) are not
        scored: their gate logit is ``-inf`` and their rank 0 (both unused: their threshold is ``+inf``)."""
        if route.present is None:
            return bank.route(pooled, route.rows)
        members = route.present.nonzero().squeeze(1)
        logits, ranks = bank.route(pooled.index_select(0, members), _subset(route.rows, members))
        size = pooled.shape[0]
        logits = logits.new_full((size,), float("-inf")).index_copy_(0, members, logits)
        if ranks is not None:
            ranks = ranks.new_zeros(size).index_copy_(0, members, ranks)
        return logits, ranks

    def _add_active(self, x: Tensor, out: Tensor, route: BankRoute, active: Tensor, rank: int | None) -> None:
        """``out += B A x`` (at ``rank``, default the bank's) for the rows where ``active``; none else."""
        bank = self.banks[route.bank]
        size = self.routing.batch_size
        if size == 1:
            if not bool(active):
                return
            rows = None
        else:
            rows = active.nonzero().squeeze(1)
            if rows.shape[0] == 0:
                return
            if rows.shape[0] == size:
                rows = None
        self.routing.adapter_rows += size if rows is None else rows.shape[0]
        if bank.integer:
            self._add_active_exact(x, out, route, rows, rank)
            return
        alpha = bank.output_scale
        bank_rows = route.rows if rows is None else _subset(route.rows, rows)
        scales = bank.variant.component_scales(bank, self.routing, x, rows, bank_rows)
        if rows is None:
            bank.add_delta(out, x, route.rows, alpha, rank, scales)
            return
        # The active rows' outputs are gathered, updated by the same fused product as above and put
        # back: a row's arithmetic (one rounding of out + alpha B A x) must not depend on whether its
        # batch-mates' gates are on, or half precision loses batch invariance.
        active_out = out.index_select(0, rows)
        bank.add_delta(active_out, x.index_select(0, rows), bank_rows, alpha, rank, scales)
        out.index_copy_(0, rows, active_out)

    def _add_active_exact(
        self, x: Tensor, out: Tensor, route: BankRoute, rows: Tensor | None, rank: int | None
    ) -> None:
        """``out += B A x`` with exact integer products for the batch rows ``rows`` (``None``: all).

        Works on flat tokens, padded or packed (``cogalora.packing``), each token with its row's adapter.
        On the CPU one compiled call updates every token with its own adapter; elsewhere the rows of up
        to :data:`STACKED_RANK` / rank adapters share one stacked product pair. A token's update never
        depends on the others either way, and both give the same bits
        (``AdapterBank.add_delta_exact_per_token``, ``AdapterBank.add_delta_exact_stacked``).
        """
        bank = self.banks[route.bank]
        layout = self.routing.layout
        tokens = self.routing.quantized(x)
        flat = out.view(-1, out.shape[-1])
        index, counts = (None, None) if rows is None else layout.tokens_of(rows)
        if isinstance(route.rows, int):
            bank.add_delta_exact(flat, tokens, route.rows, rank, tokens=index)
            return
        if rows is None:
            token_rows = route.rows.index_select(0, layout.row_of_token)
        else:
            token_rows = route.rows.index_select(0, rows).repeat_interleave(counts, output_size=index.shape[0])
        if bank.add_delta_exact_per_token(flat, tokens, token_rows, index, rank):
            return
        members = torch.arange(layout.batch_size, device=x.device) if rows is None else rows
        adapters, member_adapter = torch.unique(route.rows.index_select(0, members), return_inverse=True)
        stack = max(1, STACKED_RANK // (bank.rank if rank is None else rank))
        if adapters.shape[0] <= stack:
            parts = [(rows, adapters, member_adapter)]
        else:
            parts = []
            for first in range(0, adapters.shape[0], stack):
                chosen = ((member_adapter >= first) & (member_adapter < first + stack)).nonzero().squeeze(1)
                part_adapter = member_adapter.index_select(0, chosen) - first
                parts.append((members.index_select(0, chosen), adapters[first : first + stack], part_adapter))
        for members, adapters, member_adapter in parts:
            # Several adapters share one stacked product, which takes its tokens in blocks of one row each.
            if adapters.shape[0] == 1:
                part_index = None if members is None else layout.tokens_of(members)[0]
                bank.add_delta_exact(flat, tokens, int(adapters[0]), rank, tokens=part_index)
                continue
            if members is None:  # every row: the tokens in place
                block_rows, block_tokens = layout.blocks
                row_adapter = member_adapter.tolist()
                block_adapters = [row_adapter[row] for row in block_rows]
                bank.add_delta_exact_stacked(flat, tokens, adapters, block_adapters, block_tokens, rank)
                continue
            index, counts = layout.tokens_of(members)
            update = out.new_zeros(index.shape[0], out.shape[-1])
            selected = tokens.select(index)
            bank.add_delta_exact_stacked(update, selected, adapters, member_adapter.tolist(), counts.tolist(), rank)
            flat.index_add_(0, index, update)

    def _forward_train(self, x: Tensor, out: Tensor, routes: tuple[BankRoute, ...]) -> Tensor:
        """Dense adapter on every row, times a sampled gate (``cogalora.gates``).

        With the default straight-through Bernoulli estimator the forward value is the hard 0/1
        sample and the gradient flows to the router through ``p``; a row sampled off contributes
        exactly zero to its adapter's gradient. The ``gumbel`` estimator multiplies by a soft gate.
        The bank's variant may weigh ``A x``'s components per row (``cogalora.variants``), e.g. a
        sampled nested rank's mask, with its own gradient; with gates forced on (the warm-up) it
        decides without the router's hidden layer.
        """
        (route,) = routes
        bank = self.banks[route.bank]
        row = route.rows
        state = self.routing
        if route.routed:
            logits, hidden = bank.gate(state.pooled(x), row)
            probs, hard, gate = training_gates(logits, state.gate_estimator, state.gate_temperature)
        else:
            probs, hidden = None, None
            hard = gate = torch.ones(x.shape[0], device=x.device, dtype=out.dtype)
        choice = bank.variant.training_choice(bank, state, x, row, hidden)
        rank = bank.rank if choice.rank is None else choice.rank
        expected = (hard if probs is None else probs) * (rank if choice.expected_rank is None else choice.expected_rank)
        ranks = (hard * rank).round().long()
        state.record(self.site.index, probs, ranks > 0, ranks=ranks, expected_ranks=expected)
        delta = bank.delta(self.dropout(x), row, choice.weights)
        scale = gate * bank.output_scale
        if self.galora_gate is not None:
            scale = scale * self.galora_gate
        return out + delta * scale[:, None, None].to(delta.dtype)


class SlotHead(nn.Module):
    """A Linear head layer with its own weights per adapter (label sets differ between adapters).

    Outputs are padded with zeros up to the widest adapter's; callers slice each row to its
    adapter's ``out_features``.
    """

    def __init__(self, template: nn.Linear, routing: RoutingState) -> None:
        super().__init__()
        self.routing = routing
        self.in_features = template.in_features
        param = dict(device=template.weight.device, dtype=template.weight.dtype)
        self.weight = nn.Parameter(torch.zeros(1, template.out_features, template.in_features, **param), False)
        self.bias = nn.Parameter(torch.zeros(1, template.out_features, **param), False)
        self.slot_out_features: dict[int, int] = {}
        self._slot_rows: dict[int, int] = {}
        self.register_buffer("_row_of_slot", torch.zeros(1, dtype=torch.long), persistent=False)
        self._free: list[int] = [0]

    @property
    def out_capacity(self) -> int:
        return self.weight.shape[1]

    @torch.no_grad()
    def set_slot(self, slot: int, weight: Tensor, bias: Tensor, source: str = "head") -> None:
        out_features = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != self.in_features or tuple(bias.shape) != (out_features,):
            raise ValueError(
                f"{source}: head weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit "
                f"a layer with {self.in_features} inputs"
            )
        row = self._slot_rows.get(slot)
        if row is None:
            row = self._allocate()
            self._slot_rows[slot] = row
            if slot >= self._row_of_slot.shape[0]:
                self._row_of_slot = _grown(self._row_of_slot, (max(slot + 1, 2 * self._row_of_slot.shape[0]),))
            self._row_of_slot[slot] = row
        if out_features > self.out_capacity:
            self._resize(self.weight.shape[0], out_features)
        self.weight[row].zero_()
        self.bias[row].zero_()
        self.weight[row, :out_features] = weight
        self.bias[row, :out_features] = bias
        self.slot_out_features[slot] = out_features

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        row = self._slot_rows.pop(slot, None)
        self.slot_out_features.pop(slot, None)
        if row is not None:
            self.weight[row].zero_()
            self.bias[row].zero_()
            self._free.append(row)

    def get_slot(self, slot: int) -> tuple[Tensor, Tensor]:
        row, n = self._slot_rows[slot], self.slot_out_features[slot]
        return self.weight[row, :n].detach().clone(), self.bias[row, :n].detach().clone()

    def _allocate(self) -> int:
        if not self._free:
            capacity = self.weight.shape[0]
            self._resize(2 * capacity, self.out_capacity)
            self._free = list(range(2 * capacity - 1, capacity - 1, -1))
        return self._free.pop()

    @torch.no_grad()
    def _resize(self, capacity: int, out_capacity: int) -> None:
        grad = self.weight.requires_grad
        self.weight = nn.Parameter(_grown(self.weight.data, (capacity, out_capacity, self.in_features)), grad)
        self.bias = nn.Parameter(_grown(self.bias.data, (capacity, out_capacity)), grad)

    def forward(self, x: Tensor) -> Tensor:
        # The head input is one vector per row ([B, d]); each row's logits are a multiply-and-sum of
        # its own (never a matrix product over the batch), so they do not depend on the batch size.
        state = self.routing
        if not state.active or state.single_slot is not None:
            slot = state.single_slot if state.active else 0
            row = self._slot_rows.get(slot, 0)
            weight, bias = self.weight[row], self.bias[row]
        else:
            rows = self._row_of_slot[state.row_slots]
            weight, bias = self.weight.index_select(0, rows), self.bias.index_select(0, rows)
        return (x.unsqueeze(-2) * weight).sum(-1) + bias


class SlotLoraLinear(nn.Module):
    """``W0 x + B A x * scaling`` for the adapter of each row, at a Linear outside the gated sites.

    Plain LoRA adapters may also adapt BERT's pooler (PEFT's ``all-linear`` reaches it; see
    ``Architecture.pooler_linears``). Its input is one vector per row, so there is no router and no
    gate: a row whose adapter has a delta here gets it, every other row passes through unchanged
    (``force_gates`` concerns the gated sites only). Storage is an :class:`~cogalora.bank.AdapterBank`
    per rank (scaling folded into ``B``); the rows of a mixed batch are gathered per bank, as at the
    gated sites.
    """

    def __init__(self, base: nn.Linear, routing: RoutingState) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.banks = nn.ModuleList()
        self.entries: dict[int, tuple[int, int]] = {}
        """slot -> (bank, row) of the slots that have a delta here."""

    def set_slot(self, slot: int, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        """Store ``slot``'s delta (shapes checked by the caller)."""
        self.reset_slot(slot)
        rank = lora_A.shape[0]
        index = next((i for i, bank in enumerate(self.banks) if bank.rank == rank), None)
        if index is None:
            self.banks.append(_new_bank(self.base, rank, 1))
            index = len(self.banks) - 1
        bank = self.banks[index]
        row = bank.allocate()
        bank.write(row, lora_A.to(bank.lora_A), lora_B.to(bank.lora_B), scaling, None)
        self.entries[slot] = (index, row)

    def reset_slot(self, slot: int) -> None:
        entry = self.entries.pop(slot, None)
        if entry is not None:
            self.banks[entry[0]].release(entry[1])

    def read_slot(self, slot: int, scaling: float) -> tuple[Tensor, Tensor] | None:
        """``(A, B)`` of ``slot`` with ``B`` unscaled, or None when it has no delta here."""
        entry = self.entries.get(slot)
        if entry is None:
            return None
        lora_A, lora_B, _ = self.banks[entry[0]].read(entry[1], scaling)
        return lora_A, lora_B

    def rank_of(self, slot: int) -> int:
        entry = self.entries.get(slot)
        return 0 if entry is None else self.banks[entry[0]].rank

    @property
    def integer(self) -> bool:
        return isinstance(self.base, Int8Linear)

    @torch.no_grad()
    def use_integer_products(self) -> None:
        """Serve with exact integer products (see :meth:`GatedLoraLinear.use_integer_products`)."""
        if not self.integer:
            self.base = Int8Linear(self.base)
        for bank in self.banks:
            bank.use_integer_products()

    def forward(self, x: Tensor) -> Tensor:
        if self.integer:
            return self._forward_exact(x)
        out = self.base(x)
        state = self.routing
        if not state.active or not self.entries:
            return out
        if state.single_slot is not None:
            entry = self.entries.get(state.single_slot)
            if entry is not None:
                bank = self.banks[entry[0]]
                bank.add_delta(out.unsqueeze(1), x.unsqueeze(1), entry[1], bank.output_scale)
            return out
        members: dict[int, tuple[list[int], list[int]]] = {}
        for position, slot in enumerate(state.slots):
            entry = self.entries.get(slot)
            if entry is not None:
                positions, rows = members.setdefault(entry[0], ([], []))
                positions.append(position)
                rows.append(entry[1])
        for index, (positions, rows) in members.items():
            bank = self.banks[index]
            where = torch.tensor(positions, device=x.device)
            gathered = out.index_select(0, where).unsqueeze(1)
            bank_rows = torch.tensor(rows, device=x.device)
            bank.add_delta(gathered, x.index_select(0, where).unsqueeze(1), bank_rows, bank.output_scale)
            out.index_copy_(0, where, gathered.squeeze(1))
        return out

    def _forward_exact(self, x: Tensor) -> Tensor:
        """The forward with exact integer products: each row's delta in a product pair of its adapter."""
        rows = quantize_rows(x)
        out = self.base.forward_quantized(rows, x.shape[:-1])
        state = self.routing
        if not state.active or not self.entries:
            return out
        slots = [state.single_slot] * x.shape[0] if state.single_slot is not None else state.slots
        members: dict[tuple[int, int], list[int]] = {}
        for position, slot in enumerate(slots):
            entry = self.entries.get(slot)
            if entry is not None:
                members.setdefault(entry, []).append(position)
        for (index, row), positions in members.items():
            if len(positions) == x.shape[0]:
                self.banks[index].add_delta_exact(out, rows, row)
                continue
            where = torch.tensor(positions, device=x.device)
            update = out.new_zeros(len(positions), out.shape[-1])
            self.banks[index].add_delta_exact(update, rows.select(where), row)
            out.index_add_(0, where, update)
        return out


def _new_bank(base: nn.Linear | Int8Linear, rank: int, router_hidden: int, **options) -> AdapterBank:
    """An empty bank for adapters of ``rank`` beside ``base``: on its device, in its precision."""
    integer = isinstance(base, Int8Linear)
    weights = (base.device, torch.float32) if integer else (base.weight.device, base.weight.dtype)
    bank = AdapterBank(
        base.in_features, base.out_features, rank, router_hidden, device=weights[0], dtype=weights[1], **options
    )
    if integer:
        bank.use_integer_products()
    return bank


def _subset(bank_rows: int | Tensor, rows: Tensor) -> int | Tensor:
    """The bank rows of the batch rows ``rows`` (one shared bank row stays an int)."""
    return bank_rows if isinstance(bank_rows, int) else bank_rows.index_select(0, rows)
