"""The gated LoRA layer and routed forward: STE gradients, gating semantics, batch invariance."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import bank_row, batch, randomize_adapter, spread_routers, tiny_bert_config, tiny_model
from transformers import BertForSequenceClassification

from cogalora import CoGaLoRAConfig
from cogalora.gates import annealed_temperature, training_gates


def train_steps(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    """``steps`` AdamW steps on cross-entropy + the model's sparsity penalty, in training mode."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        out = model(ids, mask)
        loss = torch.nn.functional.cross_entropy(out.logits, labels) + model.sparsity_penalty(out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_straight_through_gradients_reach_routers_and_lora():
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0))
    randomize_adapter(model)
    model.train()
    ids, mask = batch([6, 4, 5, 3], seed=1)
    torch.manual_seed(0)
    out = model(ids, mask)
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 0, 1])) + 0.1 * out.gate_probs.mean()
    loss.backward()
    banks = [bank_row(model, site)[0] for site in range(len(model.sites))]
    for bank in banks:
        assert bank.router_w1.grad is not None and bank.router_w1.grad.abs().sum() > 0
        assert bank.router_b2.grad.abs().sum() > 0
    assert any(bank.lora_A.grad.abs().sum() > 0 for bank in banks)
    assert any(bank.lora_B.grad.abs().sum() > 0 for bank in banks)


def test_row_sampled_off_gives_no_gradient_to_that_modules_lora():
    """One row; force its sampled gate at one site to 0 by a router that outputs p ~ 0."""
    model = tiny_model(CoGaLoRAConfig(rank=4))
    randomize_adapter(model)
    site, row = bank_row(model, 0)
    with torch.no_grad():
        site.router_w2[row].zero_()
        site.router_b2[row].fill_(-60.0)  # p = sigmoid(-60) ~ 1e-26: Bernoulli samples 0
    model.train()
    ids, mask = batch([5], seed=2)
    out = model(ids, mask)
    assert not out.gates[0, 0]
    out.logits.sum().backward()
    assert site.lora_A.grad.abs().sum() == 0
    assert site.lora_B.grad.abs().sum() == 0
    other, _ = bank_row(model, 1)
    assert out.gates[0, 1] and other.lora_B.grad.abs().sum() > 0


def test_raising_lambda_lowers_mean_gate_probability():
    ids, mask = batch([6, 5, 7, 4, 6, 5, 3, 7], seed=3)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])

    def mean_prob_after_training(sparsity_lambda: float) -> float:
        model = tiny_model(CoGaLoRAConfig(rank=4, sparsity_lambda=sparsity_lambda, router_init_bias=0.0), seed=0)
        torch.manual_seed(0)
        train_steps(model, ids, mask, labels, steps=30)
        model.eval()
        with torch.no_grad():
            return model(ids, mask).gate_probs.mean().item()

    low, high = mean_prob_after_training(0.0), mean_prob_after_training(2.0)
    assert high < low - 0.1, (low, high)


def test_batch_invariance_of_gates_and_probabilities():
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0))
    randomize_adapter(model)
    spread_routers(model)
    model.eval()
    lengths = [9, 3, 12, 5, 1, 7, 12, 2]
    ids, mask = batch(lengths, seed=4)
    with torch.no_grad():
        together = model(ids, mask)
        assert 0 < together.gates.float().mean() < 1, "test needs a mix of on and off gates"
        for row, length in enumerate(lengths):
            alone = model(ids[row : row + 1, :length], mask[row : row + 1, :length])
            assert torch.equal(alone.gates[0], together.gates[row])
            torch.testing.assert_close(alone.gate_probs[0], together.gate_probs[row], atol=1e-5, rtol=0)
            torch.testing.assert_close(alone.logits.softmax(-1)[0], together.logits.softmax(-1)[row], atol=1e-5, rtol=0)


def test_router_pools_over_real_tokens_only():
    """Changing what sits in padded positions must not change any gate probability."""
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0))
    model.eval()
    ids, mask = batch([4, 8], seed=5)
    other = ids.clone()
    other[0, 4:] = 7  # garbage in row 0's padding
    with torch.no_grad():
        first, second = model(ids, mask), model(other, mask)
    torch.testing.assert_close(first.gate_probs, second.gate_probs, atol=1e-6, rtol=0)


def _merged_reference(model, slot: int = 0) -> BertForSequenceClassification:
    """An independent plain-LoRA reference: W0 + (alpha/r) B A merged into a copy of the base."""
    torch.manual_seed(0)
    reference = BertForSequenceClassification(tiny_bert_config(2)).eval()
    state = {}
    for name, tensor in model.model.state_dict().items():
        state[name.replace(".base.", ".")] = tensor
    weights = model.adapter_weights(slot)
    with torch.no_grad():
        for path, layer in model.gated_layers.items():
            lora_A, lora_B = weights.lora[path]
            state[f"{path}.weight"] = layer.base.weight + weights.scaling * lora_B @ lora_A
        head = model.head_layers["classifier"]
        state["classifier.weight"], state["classifier.bias"] = head.get_slot(slot)
    reference.load_state_dict({k: v for k, v in state.items() if k in reference.state_dict()})
    return reference


def test_all_gates_on_equals_plain_lora_and_all_off_equals_base_plus_head():
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0))
    randomize_adapter(model)
    model.eval()
    ids, mask = batch([6, 3, 8], seed=6)
    reference = _merged_reference(model)
    base_only = copy.deepcopy(reference)
    with torch.no_grad():
        for path, layer in model.gated_layers.items():
            base_only.get_submodule(path).weight.copy_(layer.base.weight)
        on = model(ids, mask, force_gates="on")
        off = model(ids, mask, force_gates="off")
        tau_one = model(ids, mask, taus=torch.ones(3))
        torch.testing.assert_close(on.logits, reference(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(off.logits, base_only(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    assert on.adapter_rows == 3 * len(model.sites)
    assert off.adapter_rows == 0 and not off.gates.any()
    assert tau_one.adapter_rows == 0 and torch.equal(tau_one.logits, off.logits)
    assert not torch.allclose(on.logits, off.logits), "adapter must change the output in this test"


def test_gated_off_rows_are_never_multiplied():
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0))
    spread_routers(model)
    model.eval()
    ids, mask = batch([5, 6, 7, 4], seed=7)
    with torch.no_grad():
        out = model(ids, mask)
    assert out.adapter_rows == int(out.gates.sum())
    assert 0 < out.adapter_rows < out.gates.numel()


def test_two_adapters_in_one_model_match_each_alone():
    first = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0), labels=("a", "b"), seed=0)
    second = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.5), labels=("w", "x", "y", "z"), seed=0)
    randomize_adapter(first, seed=1)
    randomize_adapter(second, seed=2)
    shared = tiny_model(CoGaLoRAConfig(rank=4), seed=0)
    shared.set_adapter(0, first.adapter_weights(), ["a", "b"])
    shared.set_adapter(1, second.adapter_weights(), ["w", "x", "y", "z"])
    for model in (first, second, shared):
        model.eval()
    ids, mask = batch([5, 8, 3, 6], seed=8)
    slots = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        mixed = shared(ids, mask, slots=slots)
        alone = [first(ids, mask), second(ids, mask)]
    for row, slot in enumerate(slots.tolist()):
        width = alone[slot].logits.shape[1]
        torch.testing.assert_close(mixed.logits[row, :width], alone[slot].logits[row], atol=1e-5, rtol=0)
        assert torch.equal(mixed.gates[row], alone[slot].gates[row])
    assert mixed.logits.shape[1] == 4 and torch.all(mixed.logits[slots == 0, 2:] == 0)

    shared.reset_adapter(1)
    with torch.no_grad():
        after_reset = shared(ids, mask, slots=slots)
    assert not after_reset.gates[slots == 1].any()


def test_galora_prunes_small_gates_and_folding_keeps_the_output():
    model = tiny_model(CoGaLoRAConfig(method="galora", rank=4, galora_prune_eps=0.05))
    randomize_adapter(model)
    layers = list(model.gated_layers.values())
    with torch.no_grad():
        for index, layer in enumerate(layers):
            layer.galora_gate.fill_(0.01 if index % 3 == 0 else 0.7)
    model.eval()
    ids, mask = batch([5, 7], seed=9)
    with torch.no_grad():
        before = model(ids, mask)
    pruned = model.finalize_galora()
    with torch.no_grad():
        after = model(ids, mask)
    assert pruned == [model.sites[i].name for i in range(len(layers)) if i % 3 == 0]
    assert model.site_present() == [i % 3 != 0 for i in range(len(layers))]
    # Pruned gates were 0.01: their removal changes the output only slightly.
    torch.testing.assert_close(after.logits, before.logits, atol=5e-2, rtol=0)
    assert all(layer.galora_gate is None for layer in layers)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_methods_without_routers_have_no_penalty_and_train_the_right_weights(method):
    model = tiny_model(CoGaLoRAConfig(method=method, rank=4, sparsity_lambda=1.0))
    trainable = {id(p) for p in model.trainable_parameters()}
    embeddings = model.model.bert.embeddings.word_embeddings.weight
    assert (id(embeddings) in trainable) == (method == "full")
    ids, mask = batch([4, 5])
    out = model(ids, mask)
    assert model.sparsity_penalty(out).item() == 0.0


# ---- gate estimators and router input normalisation ---------------------------------------------


def test_gumbel_estimator_is_relaxed_with_hard_gates_of_probability_p():
    logits = torch.tensor([-2.0, 0.0, 1.5]).repeat(40000, 1).reshape(-1)
    torch.manual_seed(0)
    probs, hard, gate = training_gates(logits, "gumbel", temperature=0.5)
    torch.testing.assert_close(probs, torch.sigmoid(logits))
    assert ((gate > 0.01) & (gate < 0.99)).float().mean() > 0.5, "the forward value is a soft gate"
    assert torch.equal(hard, (gate > 0.5).float()), "the hard gate is the soft gate rounded"
    observed = hard.reshape(-1, 3).mean(dim=0)
    torch.testing.assert_close(observed, torch.sigmoid(torch.tensor([-2.0, 0.0, 1.5])), atol=0.01, rtol=0)
    # Lower temperature: the same noise gives gates closer to 0/1.
    torch.manual_seed(0)
    _, _, colder = training_gates(logits, "gumbel", temperature=0.05)
    assert (colder - colder.round()).abs().mean() < (gate - gate.round()).abs().mean() / 3
    logits.requires_grad_(True)
    training_gates(logits, "gumbel", temperature=0.5)[2].sum().backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown gate estimator"):
        training_gates(logits, "bogus")
    assert annealed_temperature(1.0, 0.1, 0.0) == 1.0 and annealed_temperature(1.0, 0.1, 2.0) == pytest.approx(0.1)
    assert annealed_temperature(1.0, 0.01, 0.5) == pytest.approx(0.1)


@pytest.mark.parametrize("estimator", ["ste", "gumbel"])
def test_eval_gates_are_p_greater_than_tau_whatever_the_training_estimator(estimator):
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0))
    randomize_adapter(model)
    model.routing.gate_estimator = estimator
    model.routing.gate_temperature = 0.3
    ids, mask = batch([6, 4, 9, 2, 7], seed=11)
    labels = torch.tensor([0, 1, 0, 1, 1])
    train_steps(model, ids, mask, labels, steps=3)
    spread_routers(model, factor=4.0)
    model.eval()
    with torch.no_grad():
        for tau in (0.2, 0.5, 0.8):
            first = model(ids, mask, taus=[tau] * 5)
            again = model(ids, mask, taus=[tau] * 5)
            assert torch.equal(first.gates, again.gates), "no sampling at eval"
            assert torch.equal(first.gates, first.gate_probs > tau)
        assert 0 < model(ids, mask).gates.float().mean() < 1, "the comparison needs on and off gates"


def test_layer_norm_router_input_ignores_the_scale_of_the_pooled_input():
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0, router_input_norm="layer_norm"))
    plain = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0), seed=0)
    bank, row = bank_row(model, 0)
    plain_bank, plain_row = bank_row(plain, 0)
    assert bank.input_norm(row) == "layer_norm" and plain_bank.input_norm(plain_row) == "none"
    pooled = torch.randn(3, bank.in_features)
    with torch.no_grad():
        torch.testing.assert_close(bank.router_logits(3.0 * pooled + 0.5, row), bank.router_logits(pooled, row))
        assert not torch.allclose(
            plain_bank.router_logits(3.0 * pooled, plain_row), plain_bank.router_logits(pooled, plain_row)
        )
        # Gathered rows (a mixed batch) apply each row's own setting.
        torch.testing.assert_close(bank.router_logits(pooled, torch.tensor([row] * 3)), bank.router_logits(pooled, row))
    bank.release(row)
    assert bank.input_norm(row) == "none", "a released row forgets its setting"


def test_adapters_with_and_without_router_input_norm_share_a_batch():
    normed = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0, router_input_norm="layer_norm"), seed=0)
    plain = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0), seed=0)
    for model, seed in ((normed, 1), (plain, 2)):
        randomize_adapter(model, seed=seed)
        spread_routers(model, factor=10.0)
        model.eval()
    shared = tiny_model(CoGaLoRAConfig(rank=4), seed=0)
    shared.set_adapter(0, plain.adapter_weights(), ["neg", "pos"])
    shared.set_adapter(1, normed.adapter_weights(), ["neg", "pos"])
    assert shared.adapter_weights(1).routers[shared.sites[0].module_path].input_norm == "layer_norm"
    shared.eval()
    ids, mask = batch([5, 8, 3, 6, 9, 2], seed=12)
    slots = [0, 1, 1, 0, 1, 0]
    with torch.no_grad():
        mixed = shared(ids, mask, slots=slots)
        alone = [plain(ids, mask), normed(ids, mask)]
        one_adapter = shared(ids, mask, slots=[1] * 6)
    for row, slot in enumerate(slots):
        assert torch.equal(mixed.gates[row], alone[slot].gates[row])
        torch.testing.assert_close(mixed.logits[row], alone[slot].logits[row], atol=1e-5, rtol=0)
    torch.testing.assert_close(one_adapter.gate_probs, alone[1].gate_probs, atol=1e-6, rtol=0)
    assert 0 < alone[1].gates.float().mean() < 1
