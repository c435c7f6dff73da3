"""Gated LoRA layers that hold several adapters ("slots") over one frozen Linear.

Training uses one slot; the serving engine loads many adapters into the slots of
one shared base model. Both run this same code, so train/serve equivalence
holds by construction. The lifecycle follows vLLM's LoRA layers: the layer
*creates* stacked, zero-filled storage, then slots are *set* and *reset*.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cogalora.architectures import Site
from cogalora.routing import RoutingState
from cogalora.weights import RouterWeights


def _grown(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A zero tensor of ``shape`` (each dim >= the old one) holding ``tensor`` in its leading corner."""
    grown = tensor.new_zeros(shape)
    grown[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return grown


class SlotRouters(nn.Module):
    """The routers of every slot at one site, stacked so all rows are scored in one matmul."""

    def __init__(self, num_slots: int, in_features: int, hidden: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.w1 = nn.Parameter(torch.zeros(num_slots, hidden, in_features))
        self.b1 = nn.Parameter(torch.zeros(num_slots, hidden))
        self.w2 = nn.Parameter(torch.zeros(num_slots, hidden))
        self.b2 = nn.Parameter(torch.zeros(num_slots))

    @property
    def num_slots(self) -> int:
        return self.w1.shape[0]

    @property
    def hidden(self) -> int:
        return self.w1.shape[1]

    def forward(self, pooled: Tensor, row_slot: Tensor, slot: int | None = None) -> Tensor:
        """Gate probability of each row under its own slot's router: ``[B]``.

        ``slot``: every row belongs to this one slot (the caller knows), so only its router is scored.
        """
        if slot is not None:
            hidden_act = torch.relu(F.linear(pooled, self.w1[slot], self.b1[slot]))
            return torch.sigmoid(torch.addmv(self.b2[slot], hidden_act, self.w2[slot]))
        num_slots, hidden, _ = self.w1.shape
        # Scoring every row under every slot is one small matmul; cheaper than gathering weights per row.
        all_hidden = F.linear(pooled, self.w1.reshape(num_slots * hidden, -1), self.b1.reshape(-1))
        rows = torch.arange(pooled.shape[0], device=pooled.device)
        hidden_act = torch.relu(all_hidden.view(-1, num_slots, hidden)[rows, row_slot])
        logits = torch.einsum("bh,bh->b", hidden_act, self.w2[row_slot]) + self.b2[row_slot]
        return torch.sigmoid(logits)

    @torch.no_grad()
    def resize(self, num_slots: int, hidden: int) -> None:
        """Grow capacity; existing slots keep their weights (extra hidden units are zero, so inert)."""
        self.w1 = nn.Parameter(_grown(self.w1.data, (num_slots, hidden, self.in_features)), requires_grad=False)
        self.b1 = nn.Parameter(_grown(self.b1.data, (num_slots, hidden)), requires_grad=False)
        self.w2 = nn.Parameter(_grown(self.w2.data, (num_slots, hidden)), requires_grad=False)
        self.b2 = nn.Parameter(_grown(self.b2.data, (num_slots,)), requires_grad=False)

    @torch.no_grad()
    def set_slot(self, slot: int, weights: RouterWeights) -> None:
        hidden = weights.w1.shape[0]
        self.reset_slot(slot)
        self.w1[slot, :hidden] = weights.w1
        self.b1[slot, :hidden] = weights.b1
        self.w2[slot, :hidden] = weights.w2
        self.b2[slot] = weights.b2.reshape(())

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        for tensor in (self.w1, self.b1, self.w2, self.b2):
            tensor[slot].zero_()

    def get_slot(self, slot: int) -> RouterWeights:
        return RouterWeights(
            w1=self.w1[slot].detach().clone(),
            b1=self.b1[slot].detach().clone(),
            w2=self.w2[slot].detach().clone(),
            b2=self.b2[slot].detach().reshape(1).clone(),
        )


class GatedLoraLinear(nn.Module):
    """``W0 x + g(x) * B A x * (alpha / r)`` for the adapter slot of each row.

    ``g`` is the row's gate at this site: its router's hard decision ``p > tau`` in eval,
    a straight-through Bernoulli sample in training, 1 for un-routed (plain LoRA) slots,
    0 where the slot has no adapter here. In eval, rows whose gate is off are never
    multiplied; rows that share a slot share one low-rank product.
    """

    def __init__(
        self,
        base: nn.Linear,
        site: Site,
        routing: RoutingState,
        num_slots: int,
        rank: int,
        router_hidden: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base = base
        self.site = site
        # A plain attribute, not a submodule: the state is shared by every site of the model.
        self.routing = routing
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        param = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(num_slots, rank, base.in_features, **param))
        self.lora_B = nn.Parameter(torch.zeros(num_slots, base.out_features, rank, **param))
        self.routers = SlotRouters(num_slots, base.in_features, router_hidden).to(**param)
        self.register_buffer("scaling", torch.zeros(num_slots, **param))
        self.register_buffer("slot_present", torch.zeros(num_slots, dtype=torch.bool, device=param["device"]))
        self.register_buffer("slot_routed", torch.zeros(num_slots, dtype=torch.bool, device=param["device"]))
        #: GaLoRA's learnable scalar gate per slot; only created for GaLoRA training.
        self.galora_gate: nn.Parameter | None = None

    # ---- slot management ------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank_capacity(self) -> int:
        return self.lora_A.shape[1]

    @torch.no_grad()
    def resize(self, num_slots: int, rank: int, router_hidden: int) -> None:
        """Grow slot, rank and router capacity (serving); loaded slots are unchanged."""
        num_slots = max(num_slots, self.num_slots)
        rank = max(rank, self.rank_capacity)
        d_in, d_out = self.base.in_features, self.base.out_features
        self.lora_A = nn.Parameter(_grown(self.lora_A.data, (num_slots, rank, d_in)), requires_grad=False)
        self.lora_B = nn.Parameter(_grown(self.lora_B.data, (num_slots, d_out, rank)), requires_grad=False)
        self.scaling = _grown(self.scaling, (num_slots,))
        self.slot_present = _grown(self.slot_present, (num_slots,))
        self.slot_routed = _grown(self.slot_routed, (num_slots,))
        self.routers.resize(num_slots, max(router_hidden, self.routers.hidden))

    @torch.no_grad()
    def init_slot_for_training(self, slot: int, scaling: float, routed: bool, router_init_bias: float) -> None:
        """Fresh adapter as PEFT initialises it (A Kaiming-uniform, B zero): the model starts as the base."""
        self.reset_slot(slot)
        nn.init.kaiming_uniform_(self.lora_A[slot], a=math.sqrt(5))
        self.scaling[slot] = scaling
        self.slot_present[slot] = True
        self.slot_routed[slot] = routed
        if routed:
            routers = self.routers
            bound = 1.0 / math.sqrt(routers.in_features)
            routers.w1[slot].uniform_(-bound, bound)
            routers.w2[slot].uniform_(-0.5, 0.5)
            routers.b2[slot] = router_init_bias

    @torch.no_grad()
    def set_slot(
        self,
        slot: int,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        router: RouterWeights | None,
        source: str = "adapter",
    ) -> None:
        """Load one adapter's weights for this site into ``slot`` (shapes already validated by the caller)."""
        rank = lora_A.shape[0]
        expected_a = (rank, self.base.in_features)
        expected_b = (self.base.out_features, rank)
        if tuple(lora_A.shape) != expected_a or tuple(lora_B.shape) != expected_b:
            raise ValueError(
                f"{source}: LoRA weights for {self.site.module_path} have shapes A{tuple(lora_A.shape)} "
                f"B{tuple(lora_B.shape)}, the base model needs A{expected_a} B{expected_b}"
            )
        if rank > self.rank_capacity:
            raise ValueError(f"{source}: rank {rank} exceeds this layer's capacity {self.rank_capacity}")
        if router is not None and router.w1.shape[0] > self.routers.hidden:
            raise ValueError(f"{source}: router width {router.w1.shape[0]} exceeds capacity {self.routers.hidden}")
        self.reset_slot(slot)
        # Zero padding beyond the adapter's own rank contributes exact zeros to the product.
        self.lora_A[slot, :rank] = lora_A.to(self.lora_A)
        self.lora_B[slot, :, :rank] = lora_B.to(self.lora_B)
        self.scaling[slot] = scaling
        self.slot_present[slot] = True
        self.slot_routed[slot] = router is not None
        if router is not None:
            self.routers.set_slot(slot, RouterWeights(*(t.to(self.lora_A) for t in vars(router).values())))

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scaling[slot] = 0.0
        self.slot_present[slot] = False
        self.slot_routed[slot] = False
        self.routers.reset_slot(slot)

    def enable_galora_gate(self) -> None:
        self.galora_gate = nn.Parameter(torch.ones(self.num_slots, device=self.lora_A.device))

    @torch.no_grad()
    def fold_galora_gate(self) -> None:
        """Multiply the learned scalar gate into B so the adapter becomes plain LoRA."""
        if self.galora_gate is None:
            return
        self.lora_B.mul_(self.galora_gate.detach().to(self.lora_B)[:, None, None])
        self.galora_gate = None

    # ---- forward --------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        state = self.routing
        if not state.active:
            return out
        if not self.training:
            return self._forward_eval(x, out)
        row_slot = state.row_slot
        present = self.slot_present[row_slot]
        routed = self.slot_routed[row_slot]
        if bool(self.slot_routed.any()):
            probs = self.routers(state.pooled(x), row_slot)
            probs = torch.where(routed, probs, torch.ones_like(probs))
        else:
            probs = torch.ones(x.shape[0], device=x.device, dtype=out.dtype)
        probs = probs * present
        return self._forward_train(x, out, probs, routed, present)

    def _forward_eval(self, x: Tensor, out: Tensor) -> Tensor:
        """Hard gates; only rows whose gate is on are multiplied.

        The common case, every row of the batch on one slot, takes a short path (fewer small
        kernels); a mixed batch gathers per-row flags. Both compute the same values.
        """
        state = self.routing
        row_slot = state.row_slot
        batch_slots = state.batch_slots
        present_host = self.slot_present.tolist()
        routed_host = self.slot_routed.tolist()
        slots_here = [slot for slot in batch_slots if present_host[slot]]
        if not slots_here:
            state.record(self.site.index, state.zeros(out.dtype), state.zeros(torch.bool))
            return out
        if len(batch_slots) == 1:
            slot = batch_slots[0]
            if not routed_host[slot]:
                probs = state.ones(out.dtype)
                gates = state.ones(torch.bool)
            else:
                probs = self.routers(state.pooled(x), row_slot, slot=slot)
                gates = probs > state.row_tau
            if state.force == "on":
                gates = state.ones(torch.bool)
            elif state.force == "off":
                gates = state.zeros(torch.bool)
            state.record(self.site.index, probs, gates)
            return self._add_active_rows(x, out, gates, row_slot, single_slot=slot)
        present = self.slot_present[row_slot]
        routed = self.slot_routed[row_slot]
        if any(routed_host[slot] for slot in slots_here):
            probs = self.routers(state.pooled(x), row_slot)
            probs = torch.where(routed, probs, torch.ones_like(probs)) * present
        else:
            probs = present.to(out.dtype)
        if state.force == "on":
            gates = present
        elif state.force == "off":
            gates = torch.zeros_like(present)
        else:
            gates = present & (~routed | (probs > state.row_tau))
        state.record(self.site.index, probs, gates)
        return self._add_active_rows(x, out, gates, row_slot)

    def _forward_train(self, x: Tensor, out: Tensor, probs: Tensor, routed: Tensor, present: Tensor) -> Tensor:
        """Dense adapter on every row, times a straight-through Bernoulli gate.

        Forward value is the hard 0/1 sample; the gradient flows to the router through ``p``.
        A row sampled off contributes exactly zero to its adapter's gradient.
        """
        state = self.routing
        hard = torch.where(routed, torch.bernoulli(probs.detach()), present.to(probs.dtype))
        gate = hard + probs - probs.detach()
        row_slot = state.row_slot
        lora_in = self.dropout(x)
        delta = torch.bmm(lora_in, self.lora_A[row_slot].transpose(1, 2))
        delta = torch.bmm(delta, self.lora_B[row_slot].transpose(1, 2))
        scale = self.scaling[row_slot]
        if self.galora_gate is not None:
            scale = scale * self.galora_gate[row_slot]
        state.record(self.site.index, probs, hard.bool())
        return out + delta * (gate * scale)[:, None, None]

    def _add_active_rows(
        self, x: Tensor, out: Tensor, gates: Tensor, row_slot: Tensor, single_slot: int | None = None
    ) -> Tensor:
        """Add ``B A x`` to the rows whose gate is on, one product per slot present among them.

        ``out`` is this layer's fresh base output, so the adapter result is added into it in place.
        ``single_slot``: every row belongs to that slot (skips the grouping by slot).
        """
        if single_slot is not None:
            rows = gates.nonzero().squeeze(1)
            count = rows.shape[0]
            if count:
                self._add_slot(x, out, rows, count, single_slot)
            return out
        active_slot = torch.where(gates, row_slot, torch.full_like(row_slot, -1))
        counts = torch.bincount(active_slot + 1, minlength=self.num_slots + 1).tolist()
        if counts[0] == x.shape[0]:
            return out
        order = torch.argsort(active_slot, stable=True)
        offset = counts[0]
        for slot, count in enumerate(counts[1:]):
            if count == 0:
                continue
            self._add_slot(x, out, order[offset : offset + count], count, slot)
            offset += count
        return out

    def _add_slot(self, x: Tensor, out: Tensor, rows: Tensor, count: int, slot: int) -> None:
        """``out[rows] += B_s A_s x[rows] * scale_s``; all rows at once without a gather when every row is on."""
        full = count == x.shape[0]
        x_rows = x if full else x.index_select(0, rows)
        delta = F.linear(F.linear(x_rows, self.lora_A[slot]), self.lora_B[slot])
        galora = self.galora_gate
        if galora is None:
            scale = float(self.scaling[slot])
        else:
            delta = delta * (self.scaling[slot] * galora[slot])
            scale = 1.0
        if full:
            out.add_(delta, alpha=scale)
        else:
            out.index_add_(0, rows, delta, alpha=scale)
        self.routing.adapter_rows += count


class SlotLinear(nn.Module):
    """A Linear head layer with its own weights per slot (label sets differ between adapters).

    Outputs are padded with zeros up to the widest slot; callers slice each row to its
    slot's ``out_features``.
    """

    def __init__(self, template: nn.Linear, routing: RoutingState, num_slots: int, out_capacity: int) -> None:
        super().__init__()
        self.routing = routing
        self.in_features = template.in_features
        param = dict(device=template.weight.device, dtype=template.weight.dtype)
        self.weight = nn.Parameter(torch.zeros(num_slots, out_capacity, template.in_features, **param))
        self.bias = nn.Parameter(torch.zeros(num_slots, out_capacity, **param))
        self.slot_out_features = [0] * num_slots

    @property
    def num_slots(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def resize(self, num_slots: int, out_capacity: int) -> None:
        num_slots = max(num_slots, self.num_slots)
        out_capacity = max(out_capacity, self.weight.shape[1])
        self.weight = nn.Parameter(_grown(self.weight.data, (num_slots, out_capacity, self.in_features)), False)
        self.bias = nn.Parameter(_grown(self.bias.data, (num_slots, out_capacity)), False)
        self.slot_out_features += [0] * (num_slots - len(self.slot_out_features))

    @torch.no_grad()
    def set_slot(self, slot: int, weight: Tensor, bias: Tensor, source: str = "head") -> None:
        out_features = weight.shape[0]
        if weight.shape[1] != self.in_features or tuple(bias.shape) != (out_features,):
            raise ValueError(
                f"{source}: head weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit "
                f"a layer with {self.in_features} inputs"
            )
        if out_features > self.weight.shape[1]:
            raise ValueError(f"{source}: {out_features} outputs exceed this head's capacity {self.weight.shape[1]}")
        self.reset_slot(slot)
        self.weight[slot, :out_features] = weight.to(self.weight)
        self.bias[slot, :out_features] = bias.to(self.bias)
        self.slot_out_features[slot] = out_features

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        self.weight[slot].zero_()
        self.bias[slot].zero_()
        self.slot_out_features[slot] = 0

    def get_slot(self, slot: int) -> tuple[Tensor, Tensor]:
        n = self.slot_out_features[slot]
        return self.weight[slot, :n].detach().clone(), self.bias[slot, :n].detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        num_slots, out_capacity, _ = self.weight.shape
        state = self.routing
        if num_slots == 1 or not state.active:
            return F.linear(x, self.weight[0], self.bias[0])
        all_slots = F.linear(x, self.weight.reshape(num_slots * out_capacity, -1), self.bias.reshape(-1))
        all_slots = all_slots.view(*x.shape[:-1], num_slots, out_capacity)
        rows = torch.arange(x.shape[0], device=x.device)
        return all_slots[rows, state.row_slot]
