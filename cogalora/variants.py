"""Adapter variants: what a method adds to a gated LoRA adapter, behind one small interface.

A gated adapter adds ``g(x) * B A x`` to a frozen Linear (``cogalora.layer``). A *variant* changes
which of the adapter's rank components a row uses, and with what weight: the update becomes
``g(x) * B diag(w(x)) A x``. The gated layer and the bank call the hooks of :class:`AdapterVariant`
and never ask which method they run (as PEFT's ``LoraVariant`` keeps DoRA out of its LoRA layer):

- ``heads``: extra per-adapter router tensors (checkpoint part -> shape), stored by the bank beside
  the gate router, and read, written and checkpointed like it;
- ``ranks``: in eval, the rank each row uses (nested ranks: rank k is the first k rows of ``A`` and
  columns of ``B``, so the products run at that rank); ``None``: the adapter's rank;
- ``component_scales``: in eval, per-row weights of the rank components (``None``: all ones);
- ``training_choice``: the same decisions in training, sampled and differentiable.

Three variants exist. :data:`PLAIN` (LoRA, GaLoRA, CoGaLoRA) changes nothing. :class:`RankRouting`
(RAD-LoRA) gives every router a second head on its hidden layer, ``rank_logits = W_r h + b_r`` over
a few rank choices; in eval a row's rank is the choice of the highest logit (the first, i.e. the
smallest, on a tie). :class:`GeneratedScales` (HyperLoRA) gives every router a scale generator,
``s(x) = W_s norm(pool(x)) + b_s``, one scale per rank component: ``B diag(s(x)) A``. ``W_s`` starts
at zero and ``b_s`` at one, so a fresh adapter is plain LoRA.

HyperLoRA is a study method: training, evaluation and the analytic FLOPs support it through this
module, and its checkpoints load into a :class:`~cogalora.model.CoGaLoRAModel` like any other, but
its per-row scales have no exact integer product (``integer_products``), and the service refuses it
(``cogalora.config.STUDY_METHODS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cogalora.gates import hard_rank_choice, sampled_warmup_ranks, training_rank_choice
from cogalora.rowwise import row_matvec, rows_of

if TYPE_CHECKING:
    from cogalora.bank import AdapterBank
    from cogalora.routing import RoutingState


@dataclass(frozen=True)
class TrainingChoice:
    """A variant's decisions for the rows of one training forward (``None``: what a plain adapter does)."""

    weights: Tensor | None = None
    """``[B, rank]`` weights on ``A x``'s components, with gradient; ``None``: all ones."""
    expected_rank: Tensor | None = None
    """``[B]`` the rank each row is expected to use when its gate is on (with gradient, for the rank penalty)."""
    rank: Tensor | None = None
    """``[B]`` the rank each row uses when its gate is on; ``None``: the adapter's rank."""


NO_CHOICE = TrainingChoice()


@dataclass(frozen=True)
class AdapterVariant:
    """The plain gated adapter: every active row uses every rank component with weight one."""

    integer_products = True
    """Whether the adapter can run on exact integer products (``cogalora.int8``)."""
    heads_train_with_adapter = False
    """Whether the heads train at the adapter's learning rate (they scale its output) rather than the routers'."""

    def heads(self, in_features: int, rank: int, router_hidden: int) -> dict[str, tuple[int, ...]]:
        """Extra router tensors of one adapter: checkpoint part name -> shape."""
        return {}

    def attach(self, bank: AdapterBank) -> None:
        """Register what the variant keeps on a new bank besides the heads (buffers)."""

    def init_row(self, bank: AdapterBank, row: int, router_init_bias: float) -> None:
        """Initialise the heads of a fresh training adapter (they are zero before)."""

    def ranks(self, bank: AdapterBank, hidden: Tensor, rows: int | Tensor) -> Tensor | None:
        """Eval: the rank each row uses (``[B]`` long, 0 = off), from the routers' hidden layer ``[B, h]``."""
        return None

    def component_scales(
        self, bank: AdapterBank, state: RoutingState, x: Tensor, rows: Tensor | None, bank_rows: int | Tensor
    ) -> Tensor | None:
        """Eval: ``[n, rank]`` weights of the components for the batch rows ``rows`` of ``x`` (``None``: every
        row) whose adapters are ``bank_rows``; ``None``: all ones."""
        return None

    def training_choice(
        self, bank: AdapterBank, state: RoutingState, x: Tensor, rows: int | Tensor, hidden: Tensor | None
    ) -> TrainingChoice:
        """Training: the rows' component weights and ranks; ``hidden`` is ``None`` while gates are forced on."""
        return NO_CHOICE

    def checkpoint_fields(self) -> dict[str, object]:
        """What ``cogalora.json`` records of the variant."""
        return {}

    def router_flops(self, router_hidden: int) -> int:
        """FLOPs the heads add to a routed site's router, per example."""
        return 0

    def active_flops_per_example(self, in_features: int, rank: int) -> int:
        """FLOPs an active site spends once per example besides its products (``cogalora.flops``)."""
        return 0


PLAIN = AdapterVariant()


@dataclass(frozen=True)
class RankRouting(AdapterVariant):
    """RAD-LoRA: each router also picks, per example, a rank from ``rank_set`` (0: off)."""

    rank_set: tuple[int, ...] = ()

    def heads(self, in_features: int, rank: int, router_hidden: int) -> dict[str, tuple[int, ...]]:
        choices = len(self.rank_set)
        return {"rank_w": (choices, router_hidden), "rank_b": (choices,)}

    def attach(self, bank: AdapterBank) -> None:
        device = bank.lora_A.device
        #: ``[choices]`` the rank of each choice, and ``[choices, rank]`` its 0/1 mask over ``A``'s rows.
        choices = torch.tensor(self.rank_set, dtype=torch.long, device=device)
        masks = (torch.arange(bank.rank, device=device)[None, :] < choices[:, None]).to(torch.float32)
        bank.register_buffer("rank_choices", choices, persistent=False)
        bank.register_buffer("rank_masks", masks, persistent=False)

    def init_row(self, bank: AdapterBank, row: int, router_init_bias: float) -> None:
        # Start mostly at the largest rank, as gates start mostly on: adapters learn before the rank
        # penalty makes routers pick smaller ranks.
        bank.router_rank_w[row].uniform_(-0.5, 0.5)
        bank.router_rank_b[row, -1] = router_init_bias

    def rank_logits(self, bank: AdapterBank, hidden: Tensor, rows: int | Tensor) -> Tensor:
        """``[B, choices]``: the rank head on the routers' hidden layer, each row on its own."""
        return row_matvec(hidden, rows_of(bank.router_rank_w, rows)) + rows_of(bank.router_rank_b, rows)

    def ranks(self, bank: AdapterBank, hidden: Tensor, rows: int | Tensor) -> Tensor:
        return bank.rank_choices[hard_rank_choice(self.rank_logits(bank, hidden, rows))]

    def training_choice(
        self, bank: AdapterBank, state: RoutingState, x: Tensor, rows: int | Tensor, hidden: Tensor | None
    ) -> TrainingChoice:
        if hidden is None:  # the gates-on warm-up (cogalora.gates.RANK_WARMUPS)
            if state.rank_warmup != "sampled":
                return NO_CHOICE
            picks = sampled_warmup_ranks(bank.rank_choices, x.shape[0])
            ranks = bank.rank_choices.index_select(0, picks)
            return TrainingChoice(weights=bank.rank_masks.index_select(0, picks), expected_rank=ranks, rank=ranks)
        logits = self.rank_logits(bank, hidden, rows)
        probs, hard, weights = training_rank_choice(logits, state.gate_estimator, state.gate_temperature)
        choices = bank.rank_choices.to(probs.dtype)
        return TrainingChoice(weights=weights @ bank.rank_masks, expected_rank=probs @ choices, rank=hard @ choices)

    def checkpoint_fields(self) -> dict[str, object]:
        return {"rank_set": list(self.rank_set)}

    def router_flops(self, router_hidden: int) -> int:
        return 2 * router_hidden * len(self.rank_set)


@dataclass(frozen=True)
class GeneratedScales(AdapterVariant):
    """HyperLoRA: each router also generates, per example, a scale for each rank component."""

    integer_products = False
    heads_train_with_adapter = True
    """The scales multiply the adapter's output directly: a router learning rate would move them ~1 a step."""

    def heads(self, in_features: int, rank: int, router_hidden: int) -> dict[str, tuple[int, ...]]:
        return {"scale_w": (rank, in_features), "scale_b": (rank,)}

    def init_row(self, bank: AdapterBank, row: int, router_init_bias: float) -> None:
        bank.router_scale_b[row] = 1.0  # s(x) = 1 for every input: the adapter starts as plain LoRA

    def scales(self, bank: AdapterBank, pooled: Tensor, rows: int | Tensor) -> Tensor:
        """``[B, rank]`` scales ``W_s norm(pooled) + b_s`` of each row (float32); ``pooled`` ``[B, d_in]``."""
        normed = bank.router_input(pooled, rows)
        return row_matvec(normed, rows_of(bank.router_scale_w, rows)) + rows_of(bank.router_scale_b, rows)

    def component_scales(
        self, bank: AdapterBank, state: RoutingState, x: Tensor, rows: Tensor | None, bank_rows: int | Tensor
    ) -> Tensor:
        # Only the active rows' scales are generated: none for rows whose gate is off.
        pooled = state.pooled(x)
        return self.scales(bank, pooled if rows is None else pooled.index_select(0, rows), bank_rows)

    def training_choice(
        self, bank: AdapterBank, state: RoutingState, x: Tensor, rows: int | Tensor, hidden: Tensor | None
    ) -> TrainingChoice:
        return TrainingChoice(weights=self.scales(bank, state.pooled(x), rows))

    def active_flops_per_example(self, in_features: int, rank: int) -> int:
        return 2 * in_features * rank
