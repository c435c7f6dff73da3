"""The training loss: cross-entropy + sparsity penalty (+ self-distillation), and what steers it.

- **Site cost weights** (``--sparsity-weights``): ``sites`` counts every site alike (the original
  ``mean p``); ``flops`` weights each site by its adapter FLOPs per token, so the penalty is the
  expected fraction of the adapter's FLOPs (at rank 8 on MiniLM an FFN site costs 2.5 attention
  sites: ``2r(384 + 1536)`` against ``2r(384 + 384)``).
- **Budget controller** (``--target-active-fraction F``): lambda becomes a Lagrange multiplier,
  updated by dual ascent after every routed step, ``lambda <- max(0, lambda + eta (c - F))`` with
  ``c`` the batch's expected active fraction in the units of the weights above: the penalty's
  strength is searched by training instead of by the user. It is a budget (at most ``F``): a model
  under it sees lambda fall to 0 and no penalty, never a push to switch more adapters on.
- **Rank penalty** (RAD-LoRA, ``--rank-lambda``): ``rank_lambda * mean E[rank] / r_max`` beside the
  gate penalty, ``E[rank] = p * sum_k q_k k`` the rank a row is expected to use at a site.
- **Rank budget** (RAD-LoRA, ``--target-active-rank R``): the same dual ascent on ``rank_lambda``
  towards an expected *total* active rank ``R`` per example (the sum over sites of ``E[rank]``;
  288 = 36 sites at rank 8), measured in the penalty's units: ``c = mean E[rank] / r_max`` against
  ``R / (sites * r_max)``. Since ``E[rank]`` includes the gate probability, this one budget prices
  both switching a site off and choosing a smaller rank.
- **Self-distillation** (``--distill-weight``): the same model with every gate on, in eval mode
  and without gradient, is the teacher; the loss adds ``beta T^2 KL(teacher || routed)`` on
  temperature-``T`` softmaxes, so the routed model is pulled towards the dense one's predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cogalora import CoGaLoRAModel, RoutedOutput
from cogalora.flops import adapter_flops_per_token
from cogalora.model import expected_active

SPARSITY_WEIGHTS: tuple[str, ...] = ("sites", "flops")


def site_cost_weights(model: CoGaLoRAModel, kind: str) -> Tensor:
    """``[sites]`` penalty weights: 1 per site (``sites``) or its adapter FLOPs per token (``flops``)."""
    if kind == "sites":
        return torch.ones(len(model.sites))
    if kind == "flops":
        ranks = model.site_ranks()
        return torch.tensor(
            [float(adapter_flops_per_token(site, rank)) for site, rank in zip(model.sites, ranks, strict=True)]
        )
    raise ValueError(f"unknown sparsity weights {kind!r}; choose from {list(SPARSITY_WEIGHTS)}")


@dataclass
class BudgetController:
    """Dual ascent on the sparsity penalty's lambda towards a target expected active fraction."""

    target: float
    step_size: float
    strength: float
    """The current lambda (never negative)."""

    def update(self, measured: float) -> float:
        """One dual step after a batch whose expected active fraction was ``measured``."""
        self.strength = max(0.0, self.strength + self.step_size * (measured - self.target))
        return self.strength


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


@torch.no_grad()
def dense_teacher_logits(
    model: CoGaLoRAModel, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None
) -> Tensor:
    """The model with every adapter on, in eval mode (no dropout, no router): the distillation target."""
    was_training = model.training
    model.eval()
    try:
        return model(input_ids, attention_mask, token_type_ids, force_gates="on").logits
    finally:
        model.train(was_training)


def expected_rank_fraction(output: RoutedOutput, rank: int) -> float:
    """The batch's ``mean E[rank] / rank`` over rows and sites: the rank budget's measurement (0 without ranks)."""
    if output.expected_ranks is None or not output.expected_ranks.numel():
        return 0.0
    return float(output.expected_ranks.detach().mean()) / rank


@dataclass
class StepLoss:
    loss: Tensor
    output: RoutedOutput
    expected_active: float
    """The batch's expected active fraction (site- or FLOP-weighted as the penalty), 1 when not routed."""
    strength: float
    """Lambda applied in this step."""
    distillation: float
    expected_rank: float = 0.0
    """RAD-LoRA: the batch's ``mean E[rank] / rank`` (x sites x rank = expected total active rank)."""


class Objective:
    """Computes each step's loss; holds the site weights and the budget controller between steps."""

    def __init__(
        self,
        model: CoGaLoRAModel,
        sparsity_lambda: float,
        sparsity_weights: str = "sites",
        target_active_fraction: float | None = None,
        budget_lr: float = 0.01,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        target_active_rank: float | None = None,
    ) -> None:
        self.routed = model.config.has_routers
        self.weights = site_cost_weights(model, sparsity_weights) if self.routed else None
        if sparsity_weights == "sites":
            self.weights = None  # the plain mean: exactly the original penalty
        self.strength = sparsity_lambda
        self.controller = (
            BudgetController(target_active_fraction, budget_lr, sparsity_lambda)
            if target_active_fraction is not None and self.routed
            else None
        )
        self.distill_weight = distill_weight if self.routed else 0.0
        self.distill_temperature = distill_temperature
        self.rank = model.config.rank
        self.rank_controller = None
        """Dual ascent on ``rank_lambda`` towards ``--target-active-rank`` (RAD-LoRA only)."""
        if target_active_rank is not None and model.config.routed_ranks is not None:
            full = len(model.sites) * self.rank
            if not 0.0 < target_active_rank <= full:
                raise ValueError(
                    f"--target-active-rank must lie in (0, {full}] ({len(model.sites)} sites x rank "
                    f"{self.rank}), got {target_active_rank}"
                )
            self.rank_controller = BudgetController(target_active_rank / full, budget_lr, model.config.rank_lambda)

    def step(self, model: CoGaLoRAModel, batch, warming: bool, update_budget: bool = True) -> StepLoss:
        """Forward + loss for one batch; ``warming``: the plain-LoRA warm-up (gates on, no penalty).

        ``update_budget=False``: leave the budget controller alone; the caller updates it with the
        measurement of the whole global batch (data-parallel training measures one shard per process).
        """
        output = model(
            batch.input_ids, batch.attention_mask, batch.token_type_ids, force_gates="on" if warming else None
        )
        loss = F.cross_entropy(output.logits, batch.labels)
        if warming:
            return StepLoss(loss, output, 1.0, 0.0, 0.0)
        strength = self.controller.strength if self.controller else self.strength
        rank_strength = self.rank_controller.strength if self.rank_controller else None
        loss = loss + model.sparsity_penalty(output, self.weights, strength) + model.rank_penalty(output, rank_strength)
        distillation = 0.0
        if self.distill_weight > 0:
            teacher = dense_teacher_logits(model, batch.input_ids, batch.attention_mask, batch.token_type_ids)
            term = distillation_loss(output.logits, teacher, self.distill_temperature)
            loss = loss + self.distill_weight * term
            distillation = float(term.detach())
        measured = float(expected_active(output.gate_probs.detach(), self.weights)) if self.routed else 1.0
        rank_measured = expected_rank_fraction(output, self.rank)
        if update_budget:
            self.update_budgets(measured, rank_measured)
        return StepLoss(loss, output, measured, strength, distillation, rank_measured)

    def update_budgets(self, active: float, rank: float) -> None:
        """One dual step of each budget controller, from a (global) batch's expected active fraction and
        ``mean E[rank] / rank``."""
        if self.controller is not None:
            self.controller.update(active)
        if self.rank_controller is not None:
            self.rank_controller.update(rank)
