"""RAD-LoRA: routers that also pick a nested rank per example, on tiny random encoders."""

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

from cogalora import CoGaLoRAConfig, FlopModel
from cogalora.config import check_rank_set, parse_rank_set
from cogalora.gates import training_rank_choice


def radlora_model(seed: int = 0, rank_set: tuple[int, ...] = (0, 2, 4, 8), labels=("neg", "pos")):
    """A tiny RAD-LoRA model with random B and routers whose gates and ranks differ between inputs."""
    model = tiny_model(
        CoGaLoRAConfig(method="radlora", rank=8, rank_set=rank_set, router_init_bias=3.0), labels=labels, seed=seed
    )
    randomize_adapter(model, seed=seed + 1)
    spread_routers(model, factor=10.0)
    return model.eval()


def test_rank_set_is_validated_and_parsed():
    assert parse_rank_set("8, 0,4") == (8, 0, 4)
    assert check_rank_set((8, 0, 4), 8) == (0, 4, 8)
    for bad in [(0,), (2, 2, 8), (0, 16), (-1, 8)]:
        with pytest.raises(ValueError, match="rank set"):
            check_rank_set(bad, 8)
    with pytest.raises(ValueError, match="rank set"):
        CoGaLoRAConfig(method="radlora", rank=4, rank_set=(0, 2, 8))
    with pytest.raises(ValueError, match="integers"):
        parse_rank_set("0,two")


def test_eval_picks_several_ranks_and_a_row_at_rank_k_equals_lora_with_truncated_matrices():
    model = radlora_model()
    ids, mask = batch([9, 5, 12, 7], seed=4)
    with torch.no_grad():
        routed = model(ids, mask)
    used = set(routed.ranks.unique().tolist())
    assert {2, 4, 8} <= used | {0} and len(used - {0}) >= 2, used  # the test exercises mixed ranks
    assert torch.equal(routed.gates, routed.ranks > 0)
    for row in range(ids.shape[0]):
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for site, rank in enumerate(routed.ranks[row].tolist()):
                bank, bank_row_index = bank_row(reference, site)
                bank.lora_A[bank_row_index, rank:] = 0.0  # plain LoRA of A[:k], B[:, :k]
                bank.lora_B[bank_row_index, :, rank:] = 0.0
            dense = reference(ids[row : row + 1], mask[row : row + 1], force_gates="on")
        torch.testing.assert_close(dense.logits[0], routed.logits[row], atol=1e-5, rtol=0)


def test_hard_rank_choice_is_the_argmax_and_deterministic():
    model = radlora_model()
    bank, row = bank_row(model, 0)
    ids, mask = batch([6, 3, 8], seed=2)
    with torch.no_grad():
        bank.router_rank_w[row].zero_()
        bank.router_rank_b[row] = torch.tensor([0.0, 0.0, 5.0, 0.0])  # choice 2 of (0, 2, 4, 8): rank 4
        bank.router_b2[row] = 50.0  # gate on
        first, second = model(ids, mask), model(ids, mask)
        assert first.ranks[:, 0].tolist() == [4, 4, 4]
        assert torch.equal(first.ranks, second.ranks) and torch.equal(first.logits, second.logits)
        bank.router_rank_b[row] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # a tie goes to the first choice: off
        tied = model(ids, mask)
    assert tied.ranks[:, 0].tolist() == [0, 0, 0] and not tied.gates[:, 0].any()


def test_batch_invariance_with_rank_routing_alone_and_mixed_with_another_adapter():
    rad = radlora_model(seed=0)
    shared, ids, mask, slots = beside_a_cogalora_adapter(rad)
    with torch.no_grad():
        mixed = shared(ids, mask, slots=slots)
        padded_alone = shared(ids, mask)  # every row on the RAD-LoRA adapter, one-adapter path
        for row in range(ids.shape[0]):
            length = int(mask[row].sum())
            single = shared(ids[row : row + 1, :length], mask[row : row + 1, :length], slots=[slots[row]])
            width = 2 if slots[row] == 0 else 3
            torch.testing.assert_close(mixed.logits[row, :width], single.logits[0, :width], atol=1e-5, rtol=0)
            assert torch.equal(mixed.ranks[row], single.ranks[0])
            assert torch.equal(mixed.gates[row], single.gates[0])
            if slots[row] == 0:
                torch.testing.assert_close(padded_alone.logits[row], single.logits[0], atol=1e-5, rtol=0)
                assert torch.equal(padded_alone.ranks[row], single.ranks[0])
    on_plain = mixed.ranks[torch.tensor(slots) == 1]
    assert set(on_plain.unique().tolist()) <= {0, 8}  # CoGaLoRA rows use the full rank when on
    assert set(mixed.ranks[torch.tensor(slots) == 0].unique().tolist()) - {0, 8}


@pytest.mark.parametrize("length", [3, 17, 40])
def test_flops_count_the_rank_used_and_match_the_flop_counter(length):
    model = radlora_model(seed=length)
    ids, mask = batch([length], seed=length)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(ids, mask)
    flop_model = FlopModel.for_slot(model)
    ranks = out.ranks[0].tolist()
    analytic = flop_model.request(length, out.gates[0].tolist(), ranks=ranks)
    counted = counter.get_total_flops()
    assert abs(torch_visible_flops(flop_model, analytic) - counted) <= 0.02 * counted, (analytic, counted)
    at_full_rank = flop_model.request(length, out.gates[0].tolist())
    if any(0 < rank < 8 for rank in ranks):
        assert analytic.adapter < at_full_rank.adapter
    all_on = flop_model.request(length, [True] * len(model.sites)).adapter
    assert analytic.adapter + analytic.adapter_saved == all_on


def test_training_samples_ranks_with_gradients_and_the_rank_penalty_lowers_expected_rank():
    torch.manual_seed(0)
    _, hard, weights = training_rank_choice(torch.zeros(4000, 4, requires_grad=True))
    assert torch.all(hard.sum(1) == 1) and torch.equal(weights.detach(), hard)
    assert (hard.mean(0) - 0.25).abs().max() < 0.03  # sampled with probability q
    model = tiny_model(CoGaLoRAConfig(method="radlora", rank=8, rank_lambda=5.0), seed=1)
    randomize_adapter(model)
    ids, mask = batch([6, 9, 4, 7], seed=3)
    params = model.trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=0.05)
    model.train()
    expected = []
    for _ in range(30):
        out = model(ids, mask)
        assert out.expected_ranks is not None and out.expected_ranks.shape == out.ranks.shape
        loss = model.rank_penalty(out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        expected.append(float(out.expected_ranks.detach().mean()))
    bank, _ = bank_row(model, 0)
    assert bank.router_rank_w.grad is not None
    assert expected[-1] < 0.5 * expected[0]


def test_sampled_rank_warmup_trains_every_nested_rank_and_full_warmup_only_the_full_rank():
    model = radlora_model(seed=2)
    ids, mask = batch([5, 9, 3, 7, 6, 8, 4, 10] * 4, seed=7)
    model.train()
    torch.manual_seed(0)
    assert model.routing.rank_warmup == "sampled"  # the default (docs/results.md)
    with torch.no_grad():
        model.routing.rank_warmup = "full"
        full = model(ids, mask, force_gates="on")
        model.routing.rank_warmup = "sampled"
        sampled = model(ids, mask, force_gates="on")
    assert torch.all(full.ranks == 8)
    assert set(sampled.ranks.unique().tolist()) == {2, 4, 8}  # every nonzero rank, never off
    for site in range(sampled.ranks.shape[1]):
        assert len(sampled.ranks[:, site].unique()) > 1  # drawn per row, not once per site
    for row in (0, 1, 2):  # a row's warm-up output is plain LoRA of its sampled truncated matrices
        reference = copy.deepcopy(model).eval()
        with torch.no_grad():
            for site, rank in enumerate(sampled.ranks[row].tolist()):
                bank, bank_row_index = bank_row(reference, site)
                bank.lora_A[bank_row_index, rank:] = 0.0
                bank.lora_B[bank_row_index, :, rank:] = 0.0
            dense = reference(ids[row : row + 1], mask[row : row + 1], force_gates="on")
        torch.testing.assert_close(dense.logits[0], sampled.logits[row], atol=1e-5, rtol=0)
    model.eval()  # the warm-up mode is a training-time choice: eval routing does not read it
    with torch.no_grad():
        sampled_eval = model(ids, mask)
        model.routing.rank_warmup = "full"
        full_eval = model(ids, mask)
    assert torch.equal(sampled_eval.logits, full_eval.logits) and torch.equal(sampled_eval.ranks, full_eval.ranks)
