"""Analytic per-request FLOPs agree with torch's FlopCounterMode on the same forward."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, randomize_adapter, spread_routers, tiny_model, torch_visible_flops
from torch.utils.flop_counter import FlopCounterMode

from cogalora import CoGaLoRAConfig, FlopModel


def _counted(model, ids, mask, force):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(ids, mask, force_gates=force)
    return counter.get_total_flops(), out


# FlopCounterMode does not count CPU scaled-dot-product attention kernels, so the tiny models use
# eager attention (the same math as explicit matmuls).
@pytest.mark.parametrize("length", [1, 5, 17, 40])
@pytest.mark.parametrize("force", [None, "on", "off"])
def test_analytic_flops_match_flop_counter(length, force):
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0))
    randomize_adapter(model)
    spread_routers(model)
    model.eval()
    ids, mask = batch([length], seed=length)
    counted, out = _counted(model, ids, mask, force)
    flop_model = FlopModel.for_slot(model)
    analytic = flop_model.request(length, out.gates[0].tolist(), routers=force is None)
    assert abs(torch_visible_flops(flop_model, analytic) - counted) <= 0.02 * counted, (analytic, counted)
    all_on = FlopModel.for_slot(model).request(length, [True] * len(model.sites)).adapter
    assert analytic.adapter + analytic.adapter_saved == all_on


def test_flops_for_a_pruned_adapter_and_plain_lora():
    model = tiny_model(CoGaLoRAConfig(method="lora", rank=4))
    model.drop_sites([0, 3, 5])
    model.eval()
    ids, mask = batch([11], seed=3)
    counted, out = _counted(model, ids, mask, None)
    flop_model = FlopModel.for_slot(model)
    flops = flop_model.request(11, out.gates[0].tolist())
    assert out.gates[0].tolist() == model.site_present()
    assert flops.router == 0
    assert abs(torch_visible_flops(flop_model, flops) - counted) <= 0.02 * counted


def test_adapter_flops_grow_with_active_sites():
    model = tiny_model(CoGaLoRAConfig(rank=4))
    flop_model = FlopModel.for_slot(model)
    sites = len(model.sites)
    none = flop_model.request(10, [False] * sites)
    some = flop_model.request(10, [True] * 3 + [False] * (sites - 3))
    assert none.adapter == 0 and some.adapter > 0
    assert some.total - none.total == some.adapter
    assert flop_model.request(20, [False] * sites).base > 2 * none.base  # attention grows with T^2
