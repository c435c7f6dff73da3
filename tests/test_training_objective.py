"""The training objective's options on tiny random encoders: FLOP weights, budget controller,
self-distillation (``training.objective``)."""

from __future__ import annotations

import pytest
import torch
from conftest import bank_row, batch, randomize_adapter, spread_routers, tiny_model

from cogalora import CoGaLoRAConfig, FlopModel
from cogalora.model import expected_active
from training.data import Batch
from training.objective import (
    BudgetController,
    Objective,
    dense_teacher_logits,
    distillation_loss,
    site_cost_weights,
)


def toy_batch(lengths: list[int], seed: int) -> Batch:
    ids, mask = batch(lengths, seed=seed)
    labels = torch.tensor([row % 2 for row in range(len(lengths))])
    rows = torch.arange(len(lengths))
    return Batch(indices=rows, input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=labels)


def test_flop_weights_are_the_analytic_adapter_flops_of_each_site() -> None:
    model = tiny_model(CoGaLoRAConfig(rank=4))
    weights = site_cost_weights(model, "flops")
    flop_model = FlopModel.for_slot(model)
    sites = len(model.sites)
    for site in range(sites):
        only_this = [i == site for i in range(sites)]
        assert weights[site].item() * 7 == flop_model.request(7, only_this).adapter  # per token x 7 tokens
    assert torch.equal(site_cost_weights(model, "sites"), torch.ones(sites))
    ffn_up = next(i for i, s in enumerate(model.sites) if s.kind == "ffn.up")
    query = next(i for i, s in enumerate(model.sites) if s.kind == "attention.query")
    assert weights[ffn_up] > weights[query]


def test_flop_weighted_penalty_is_the_expected_fraction_of_adapter_flops() -> None:
    model = tiny_model(CoGaLoRAConfig(rank=4))
    weights = site_cost_weights(model, "flops")
    expected = weights.tolist()
    # Only the FFN sites on: the weighted mean is their share of the FLOPs, the plain one 2 of 6 kinds.
    probs = torch.tensor([[1.0 if site.kind.startswith("ffn.") else 0.0 for site in model.sites]])
    ffn_share = sum(w for w, site in zip(expected, model.sites, strict=True) if site.kind.startswith("ffn."))
    assert float(expected_active(probs, weights)) == pytest.approx(ffn_share / sum(expected))
    assert float(expected_active(probs)) == pytest.approx(1 / 3)


def test_budget_controller_drives_the_mean_gate_probability_to_the_target() -> None:
    # Toy problem: one logit per "site", trained on penalty strength * mean p against a pull towards on.
    torch.manual_seed(0)
    logits = torch.zeros(36, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=10.0)  # the mean over 36 sites divides each gradient by 36
    controller = BudgetController(target=0.25, step_size=0.05, strength=0.0)
    for _ in range(2000):
        probs = torch.sigmoid(logits)
        loss = -0.1 * torch.log(probs).mean() + controller.strength * probs.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller.update(float(probs.detach().mean()))
    assert abs(float(torch.sigmoid(logits.detach()).mean()) - 0.25) < 0.03
    assert controller.strength == pytest.approx(0.4, abs=0.02)  # the optimum: p = 0.1 / lambda
    controller.update(-100.0)
    assert controller.strength == 0.0, "lambda never goes negative"


def test_distillation_is_zero_when_every_gate_is_on_and_positive_otherwise() -> None:
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0))
    randomize_adapter(model)
    spread_routers(model)
    model.eval()
    ids = torch.randint(5, 60, (6, 9))
    mask = torch.ones_like(ids)
    teacher = dense_teacher_logits(model, ids, mask, None)
    with torch.no_grad():
        all_on = model(ids, mask, force_gates="on").logits
        routed = model(ids, mask).logits
    assert distillation_loss(all_on, teacher).item() == 0.0
    assert distillation_loss(routed, teacher).item() > 0.0
    assert distillation_loss(routed, teacher, temperature=2.0).item() > 0.0


def _train_routers(objective: Objective, model, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-2)
    model.train()
    measured = []
    for step in range(steps):
        result = objective.step(model, toy_batch([5, 9, 3, 7, 6, 8, 4, 2], seed=step), warming=False)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        measured.append(result.expected_active)
    return measured


def test_the_objective_trains_a_model_to_its_budget():
    # A fresh adapter (B = 0) gives the routers no task gradient: what moves them is the penalty.
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=2.0))  # starts at p ~ 0.88
    objective = Objective(model, sparsity_lambda=0.0, target_active_fraction=0.25, budget_lr=0.2)
    torch.manual_seed(0)
    measured = _train_routers(objective, model, steps=80)
    assert measured[0] > 0.8
    assert objective.controller is not None and objective.controller.strength > 0
    late = sum(measured[-20:]) / 20
    assert abs(late - 0.25) < 0.06, late


def test_a_budget_above_the_models_use_never_penalises():
    """The target is a budget (at most F): lambda starts at 0 and stays there while the model is under it."""
    runs = []
    for target in (0.95, None):
        model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=2.0))
        randomize_adapter(model)
        objective = Objective(model, sparsity_lambda=0.0, target_active_fraction=target, budget_lr=0.2)
        torch.manual_seed(0)
        runs.append(_train_routers(objective, model, steps=10))
        assert objective.controller is None or objective.controller.strength == 0.0
    assert runs[0] == runs[1]


def test_fixed_lambda_without_a_target_is_the_seed_penalty():
    model = tiny_model(CoGaLoRAConfig(rank=4, sparsity_lambda=0.3, router_init_bias=0.0))
    objective = Objective(model, sparsity_lambda=0.3)
    assert objective.controller is None and objective.weights is None
    torch.manual_seed(1)
    model.train()
    result = objective.step(model, toy_batch([4, 6, 3], seed=1), warming=False)
    ce = torch.nn.functional.cross_entropy(result.output.logits, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(result.loss, ce + 0.3 * result.output.gate_probs.mean())
    warm = objective.step(model, toy_batch([4, 6, 3], seed=1), warming=True)
    assert bool(warm.output.gates.all()) and warm.strength == 0.0, "warm-up: gates on, no penalty"


def test_distillation_in_the_training_step_vanishes_when_every_sampled_gate_is_on():
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0))
    randomize_adapter(model)
    objective = Objective(model, sparsity_lambda=0.0, distill_weight=1.0)
    data = toy_batch([5, 8, 3, 6], seed=2)
    with torch.no_grad():
        for site in range(len(model.sites)):
            bank, row = bank_row(model, site)
            bank.router_b2[row].fill_(50.0)  # p = 1: every sampled gate is on
    model.train()
    all_on = objective.step(model, data, warming=False)
    assert bool(all_on.output.gates.all())
    assert all_on.distillation == pytest.approx(0.0, abs=1e-6), "the routed model is the teacher"
    with torch.no_grad():
        for site in range(len(model.sites)):
            bank, row = bank_row(model, site)
            bank.router_b2[row].fill_(0.0)  # p = 0.5: about half the gates off
    torch.manual_seed(3)
    routed = objective.step(model, data, warming=False)
    assert not bool(routed.output.gates.all())
    assert routed.distillation > 100 * max(all_on.distillation, 1e-9)
    routed.loss.backward()
    assert any(bank_row(model, s)[0].router_w1.grad is not None for s in range(len(model.sites)))


def test_the_rank_budget_trains_a_radlora_model_to_its_total_active_rank():
    """``target_active_rank``: dual ascent on rank_lambda until the expected total rank (sum over sites of
    p * E[k]) is the budget; the fixed-lambda model beside it stays far above."""
    results = {}
    for target in (None, 6.0):
        model = tiny_model(CoGaLoRAConfig(method="radlora", rank=4, rank_set=(0, 2, 4), router_init_bias=2.0))
        objective = Objective(model, sparsity_lambda=0.0, target_active_rank=target, budget_lr=0.2)
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-2)
        model.train()
        totals = []
        for step in range(80):
            result = objective.step(model, toy_batch([5, 9, 3, 7, 6, 8, 4, 2], seed=step), warming=False)
            optimizer.zero_grad()
            result.loss.backward()
            optimizer.step()
            totals.append(result.expected_rank * len(model.sites) * 4)
        results[target] = (sum(totals[-20:]) / 20, objective)
    unbudgeted, free = results[None]  # 12 sites at rank 4: at most 48
    assert free.rank_controller is None and unbudgeted > 3 * 6.0
    late, budgeted = results[6.0]
    assert budgeted.rank_controller is not None and budgeted.rank_controller.strength > 0
    assert abs(late - 6.0) < 2.0, late


def test_the_rank_budget_is_rejected_out_of_range_and_ignored_without_rank_routing():
    model = tiny_model(CoGaLoRAConfig(method="radlora", rank=4, rank_set=(0, 2, 4)))
    with pytest.raises(ValueError, match=r"\(0, 48\]"):
        Objective(model, sparsity_lambda=0.0, target_active_rank=49.0)
    cogalora = tiny_model(CoGaLoRAConfig(rank=4))
    assert Objective(cogalora, sparsity_lambda=0.0, target_active_rank=6.0).rank_controller is None
