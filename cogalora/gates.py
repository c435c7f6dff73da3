"""Training-time gate estimators: how a router's logit becomes a differentiable gate.

Inference never samples: a gate is the hard decision ``p > tau`` (``cogalora.layer``), whatever
estimator trained the router. In training:

- ``ste`` (the default): ``hard ~ Bernoulli(p)``, forward value ``hard``, gradient through ``p``
  (``hard + p - p.detach()``).
- ``gumbel``: the relaxed Bernoulli (Gumbel-sigmoid, Maddison et al. / Jang et al. 2017):
  ``sigmoid((logit + L) / T)`` with logistic noise ``L``; the forward value is this soft gate, so
  the gradient is the reparameterised one, and annealing ``T`` towards 0 makes it nearly hard.
  The recorded hard gate is ``logit + L > 0``, whose probability is exactly ``p``: the sparsity
  penalty ``mean p`` is the expected fraction of hard gates under both estimators.

RAD-LoRA's rank head picks one of a few ranks per example, with the categorical counterparts:

- ``ste``: ``choice ~ Categorical(q)``, forward value the one-hot ``hard``, gradient through ``q``
  (``hard + q - q.detach()``).
- ``gumbel``: the relaxed categorical (Gumbel-softmax) ``softmax((logits + G) / T)``; the recorded hard
  choice is ``argmax(logits + G)``, distributed exactly as ``q``.

In eval the choice is deterministic: :func:`hard_rank_choice`, the highest logit (the first on a tie).

During the plain-LoRA warm-up (gates forced on, routers untouched) a rank-routing adapter trains
either its full rank only (``full``) or, per row and site, a rank drawn uniformly from the nonzero
ranks of its rank set (``sampled``, the DyLoRA / Matryoshka way: every nested prefix is trained as an
adapter of its own before the rank head starts choosing): :func:`sampled_warmup_ranks`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

GateEstimator = Literal["ste", "gumbel"]
GATE_ESTIMATORS: tuple[str, ...] = ("ste", "gumbel")
RANK_WARMUPS: tuple[str, ...] = ("full", "sampled")
"""What a RAD-LoRA adapter trains during the gates-on warm-up: its full rank, or a sampled nested rank."""
DEFAULT_RANK_WARMUP = "sampled"
"""Sampled: on SST-2 sentences (16k rows, seeds 0 / 1) 86.8 / 85.5 % at total rank 31.5 / 19.8, against
84.1 / 85.5 % at 47.6 / 55.1 for ``full`` (docs/results.md, "Rank routing")."""


def training_gates(logits: Tensor, estimator: str = "ste", temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(probs, hard, gate)`` for ``[B]`` router logits.

    ``probs``: ``sigmoid(logits)`` (with grad, for the sparsity penalty); ``hard``: the sampled
    0/1 decisions (float, no grad); ``gate``: what multiplies the adapter output in the forward.
    """
    probs = torch.sigmoid(logits)
    if estimator == "ste":
        hard = torch.bernoulli(probs.detach())
        return probs, hard, hard + probs - probs.detach()
    if estimator == "gumbel":
        if temperature <= 0:
            raise ValueError(f"gumbel gate temperature must be > 0, got {temperature}")
        uniform = torch.rand_like(logits).clamp_(1e-6, 1.0 - 1e-6)
        noisy = logits + torch.log(uniform) - torch.log1p(-uniform)
        return probs, (noisy.detach() > 0).to(logits.dtype), torch.sigmoid(noisy / temperature)
    raise ValueError(f"unknown gate estimator {estimator!r}; choose from {list(GATE_ESTIMATORS)}")


def training_rank_choice(
    logits: Tensor, estimator: str = "ste", temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(probs, hard, weights)``, each ``[B, choices]``, for rank-head logits ``[B, choices]``.

    ``probs``: ``softmax(logits)`` (with grad, for the rank penalty); ``hard``: the sampled one-hot
    choice (no grad); ``weights``: what weighs each choice in the forward.
    """
    probs = torch.softmax(logits, dim=-1)
    if estimator == "ste":
        index = torch.multinomial(probs.detach(), 1).squeeze(1)
        hard = torch.nn.functional.one_hot(index, logits.shape[-1]).to(probs.dtype)
        return probs, hard, hard + probs - probs.detach()
    if estimator == "gumbel":
        if temperature <= 0:
            raise ValueError(f"gumbel rank temperature must be > 0, got {temperature}")
        uniform = torch.rand_like(logits).clamp_(1e-6, 1.0 - 1e-6)
        noisy = logits - torch.log(-torch.log(uniform))
        hard = torch.nn.functional.one_hot(noisy.detach().argmax(dim=-1), logits.shape[-1]).to(probs.dtype)
        return probs, hard, torch.softmax(noisy / temperature, dim=-1)
    raise ValueError(f"unknown gate estimator {estimator!r}; choose from {list(GATE_ESTIMATORS)}")


def sampled_warmup_ranks(rank_choices: Tensor, rows: int) -> Tensor:
    """``[rows]`` indices into ``rank_choices``, uniform over the choices above 0 (warm-up ``sampled``)."""
    nonzero = (rank_choices > 0).nonzero().squeeze(1)
    picks = torch.randint(nonzero.shape[0], (rows,), device=rank_choices.device)
    return nonzero[picks]


def hard_rank_choice(logits: Tensor) -> Tensor:
    """``[B]`` index of the eval-time rank choice: the highest logit, the first (smallest rank) on a tie."""
    return logits.argmax(dim=-1)


def annealed_temperature(start: float, end: float, progress: float) -> float:
    """Geometric interpolation from ``start`` (progress 0) to ``end`` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return math.exp((1.0 - progress) * math.log(start) + progress * math.log(end))
