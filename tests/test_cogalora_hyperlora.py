"""HyperLoRA: routers that also generate a scale per rank component, B diag(s(x)) A."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    bank_row,
    batch,
    beside_a_cogalora_adapter,
    randomize_adapter,
    spread_routers,
    tiny_model,
    torch_visible_flops,
)
from torch.utils.flop_counter import FlopCounterMode

from cogalora import CheckpointMeta, CoGaLoRAConfig, FlopModel, save_checkpoint
from cogalora.checkpoint import read_adapter


def hyperlora_model(seed: int = 0, labels=("neg", "pos")):
    """A tiny HyperLoRA model with random B, spread routers and scale generators that vary with the input."""
    model = tiny_model(CoGaLoRAConfig(method="hyperlora", rank=8, router_init_bias=0.0), labels=labels, seed=seed)
    randomize_adapter(model, seed=seed + 1)
    spread_routers(model)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for site in range(len(model.sites)):
            bank, row = bank_row(model, site)
            bank.router_scale_w[row].copy_(torch.randn(bank.router_scale_w[row].shape, generator=generator) * 3)
    return model.eval()


def site_inputs(model, ids, mask) -> dict[int, torch.Tensor]:
    """Each site's input of a one-row forward, captured by hooks."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda module, args: captured.__setitem__(module.site.index, args[0]))
        for layer in model.layers
    ]
    try:
        with torch.no_grad():
            model(ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def test_a_fresh_adapter_is_plain_lora_and_scales_are_trained():
    model = tiny_model(CoGaLoRAConfig(method="hyperlora", rank=8), seed=3)
    bank, row = bank_row(model, 0)
    assert torch.all(bank.router_scale_b[row] == 1) and torch.all(bank.router_scale_w[row] == 0)
    assert bank.router_scale_w.requires_grad and bank.router_scale_w.dtype == torch.float32
    randomize_adapter(model)
    plain = copy.deepcopy(model)
    for layer in plain.layers:
        for bank_ in layer.banks:
            bank_.generated_scales = False  # the same adapter without generated scales
    ids, mask = batch([5, 8, 3], seed=1)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).logits, plain(ids, mask).logits, atol=1e-6, rtol=0)
    model.train()
    out = model(ids, mask, force_gates="on")  # the warm-up trains the generators too
    out.logits.sum().backward()
    assert bank.router_scale_w.grad is not None and bank.router_scale_w.grad.abs().sum() > 0


def test_each_row_equals_plain_lora_with_its_scaled_matrices():
    model = hyperlora_model()
    ids, mask = batch([9, 5, 12, 7], seed=4)
    with torch.no_grad():
        routed = model(ids, mask)
    assert routed.gates.any() and not routed.gates.all()
    scales_differ = False
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        row_ids, row_mask = ids[row : row + 1, :length], mask[row : row + 1, :length]
        inputs = site_inputs(model, row_ids, row_mask)
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for site, x in inputs.items():
                bank, index = bank_row(reference, site)
                scales = bank.component_scales(x.mean(dim=1), index)[0]
                scales_differ |= bool((scales - 1).abs().max() > 0.1)
                bank.lora_A[index].mul_(scales[:, None])  # B diag(s) A = B (diag(s) A)
                bank.generated_scales = False
            expected = reference(row_ids, row_mask)
        assert torch.equal(expected.gates[0], routed.gates[row])
        torch.testing.assert_close(expected.logits[0], routed.logits[row], atol=1e-5, rtol=0)
    assert scales_differ  # the test exercises scales far from 1


def test_batch_invariance_alone_and_mixed_with_another_adapter():
    hyper = hyperlora_model(seed=0)
    shared, ids, mask, slots = beside_a_cogalora_adapter(hyper)
    with torch.no_grad():
        mixed = shared(ids, mask, slots=slots)
        padded_alone = shared(ids, mask)
        trained = hyper(ids, mask)
        torch.testing.assert_close(padded_alone.logits[:, :2], trained.logits, atol=1e-5, rtol=0)  # train/serve
        for row in range(ids.shape[0]):
            length = int(mask[row].sum())
            single = shared(ids[row : row + 1, :length], mask[row : row + 1, :length], slots=[slots[row]])
            width = 2 if slots[row] == 0 else 3
            torch.testing.assert_close(mixed.logits[row, :width], single.logits[0, :width], atol=1e-5, rtol=0)
            assert torch.equal(mixed.gates[row], single.gates[0])
            if slots[row] == 0:
                torch.testing.assert_close(padded_alone.logits[row], single.logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [3, 17, 40])
def test_flops_count_the_scale_generators_of_active_sites_and_match_the_flop_counter(length):
    model = hyperlora_model(seed=length)
    ids, mask = batch([length], seed=length)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(ids, mask)
    flop_model = FlopModel.for_slot(model)
    gates = out.gates[0].tolist()
    analytic = flop_model.request(length, gates)
    counted = counter.get_total_flops()
    # The scale generators are per-row multiply-and-sums too: torch does not count them either.
    generated = sum(flops for flops, on in zip(flop_model.adapter_per_example, gates, strict=True) if on)
    visible = torch_visible_flops(flop_model, analytic) - generated
    assert abs(visible - counted) <= 0.02 * counted, (analytic, counted)
    generators = sum(2 * site.in_features * 8 for site, on in zip(model.sites, gates, strict=True) if on)
    per_token = sum(f for f, on in zip(flop_model.adapter_per_token, gates, strict=True) if on)
    assert analytic.adapter == length * per_token + generators
    all_on = flop_model.request(length, [True] * len(model.sites)).adapter
    assert analytic.adapter + analytic.adapter_saved == all_on


def test_checkpoint_round_trip_keeps_the_scale_generators(tmp_path):
    model = hyperlora_model(seed=2)
    config = model.config
    meta = CheckpointMeta(
        format_version=1,
        method="hyperlora",
        base_model="unused",
        labels=["neg", "pos"],
        max_length=64,
        rank=8,
        alpha=16.0,
        target_modules=list(config.target_modules),
        tau=0.5,
        router={"hidden": config.router_hidden},
        **{"lambda": 0.0},
    )
    save_checkpoint(model, tmp_path / "hyper", meta)
    weights = model.adapter_weights()
    assert weights.generated_scales
    shared = tiny_model(CoGaLoRAConfig(rank=8), seed=2).eval()
    _, loaded = read_adapter(tmp_path / "hyper")
    assert loaded.generated_scales
    shared.set_adapter(0, loaded, ["neg", "pos"])
    ids, mask = batch([6, 10, 3], seed=9)
    with torch.no_grad():
        torch.testing.assert_close(shared(ids, mask).logits, model(ids, mask).logits, atol=1e-6, rtol=0)
