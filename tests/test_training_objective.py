"""The training objective's options: FLOP weights, budget controller, self-distillation."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapter, spread_routers, tiny_model

from cogalora import CoGaLoRAConfig, FlopModel
from training.objective import BudgetController, dense_teacher_logits, distillation_loss, site_cost_weights


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
    assert abs(float(torch.sigmoid(logits).mean()) - 0.25) < 0.03
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
