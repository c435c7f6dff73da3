"""The lean eval forward of encoder layers: the family's numbers, bit for bit, without its module tree."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, randomize_adapter, spread_routers, tiny_bert_config
from transformers import (
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from cogalora import CoGaLoRAConfig, CoGaLoRAModel
from cogalora.architectures import find_encoder_layers

_SMALL = dict(vocab_size=80, max_position_embeddings=70, num_labels=3)
FAMILIES = {
    "bert": lambda: BertForSequenceClassification(tiny_bert_config(3, attn_implementation="sdpa")),
    "roberta": lambda: RobertaForSequenceClassification(
        RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **_SMALL)
    ),
    "distilbert": lambda: DistilBertForSequenceClassification(
        DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **_SMALL)
    ),
}


def routed_model(family: str, targets: tuple[str, ...] | None = None) -> CoGaLoRAModel:
    """A serving model of ``family`` with a trained-looking routed adapter in slot 0."""
    config = CoGaLoRAConfig(rank=4, router_init_bias=0.0, **({"target_modules": targets} if targets else {}))
    torch.manual_seed(0)
    trained = CoGaLoRAModel(FAMILIES[family]().eval(), config)
    trained.prepare_for_training(["a", "b", "c"])
    randomize_adapter(trained, seed=3)
    spread_routers(trained)
    torch.manual_seed(0)
    model = CoGaLoRAModel(FAMILIES[family]().eval(), config).eval()
    model.set_adapter(0, trained.adapter_weights(), ["a", "b", "c"])
    return model


def attention_calls(model: CoGaLoRAModel) -> list[int]:
    """A counter of calls into the family's own attention modules (the lean forward never makes one)."""
    calls = [0]
    for layer in find_encoder_layers(model.model):
        layer.attention.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eval_forwards_skip_the_family_modules_and_give_its_numbers_bit_for_bit(family: str, precision: str) -> None:
    model = routed_model(family).set_precision(precision)
    assert model.lean_layers is not None, f"{family} has a layer recipe"
    assert model.lean_classifier is not None, f"{family} has a classifier recipe"
    calls = attention_calls(model)
    top_calls = [0]  # calls into the family's model-level forward
    model.model.register_forward_pre_hook(lambda *_: top_calls.__setitem__(0, top_calls[0] + 1))
    ids, mask = batch([7, 2, 11, 7, 4], vocab=70, seed=2)  # unsorted, one repeated length
    taus = [0.5, 0.3, 0.5, 0.7, 0.5]
    with torch.inference_mode():
        lean = model(ids, mask, taus=taus)
        assert calls[0] == 0, "an eval forward went through the family's attention modules"
        assert top_calls[0] == 0, "an eval forward went through the family's model-level forward"
        model.lean_layers.enabled = False
        family_forward = model(ids, mask, taus=taus)
        assert calls[0] == 2, "with the lean forward off, each of the two layers runs its attention module"
        assert top_calls[0] == 1
    assert lean.gates.any() and not lean.gates.all(), "needs a mix of gates on and off"
    assert torch.equal(lean.logits, family_forward.logits)
    assert torch.equal(lean.gates, family_forward.gates)
    assert torch.equal(lean.ranks, family_forward.ranks)


def test_sites_on_some_kinds_only_leave_plain_linears_that_the_lean_forward_still_calls() -> None:
    model = routed_model("bert", targets=("attention.value", "ffn.down")).set_precision("int8")
    ids, mask = batch([6, 3, 9], vocab=60, seed=5)
    with torch.inference_mode():
        lean = model(ids, mask)
        model.lean_layers.enabled = False
        family_forward = model(ids, mask)
    assert torch.equal(lean.logits, family_forward.logits)
    assert torch.equal(lean.gates, family_forward.gates)


def test_training_forwards_run_the_family_modules() -> None:
    torch.manual_seed(0)
    model = CoGaLoRAModel(FAMILIES["bert"]().eval(), CoGaLoRAConfig(rank=4))
    model.prepare_for_training(["a", "b", "c"])
    calls = attention_calls(model)
    model.train()
    ids, mask = batch([5, 3], vocab=60)
    model(ids, mask)
    assert calls[0] == 2, "training keeps the family's forward (dropout, checkpointing)"


def test_eager_attention_models_keep_the_family_forward() -> None:
    """The FLOP-counting tests run eager attention: no length groups, no lean forward."""
    torch.manual_seed(0)
    model = CoGaLoRAModel(BertForSequenceClassification(tiny_bert_config(2)).eval(), CoGaLoRAConfig(rank=4))
    assert model.lean_layers is None


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_token_types_reach_the_embeddings_of_the_lean_forward(family: str) -> None:
    model = routed_model(family).set_precision("int8")  # both tiny configs have two token types
    ids, mask = batch([6, 3, 9], vocab=60, seed=5)
    token_types = (torch.arange(ids.shape[1]) >= 2).long().expand_as(ids).contiguous()
    with torch.inference_mode():
        lean = model(ids, mask, token_types)
        without = model(ids, mask)
        model.lean_layers.enabled = False
        family_forward = model(ids, mask, token_types)
    assert torch.equal(lean.logits, family_forward.logits)
    assert not torch.equal(lean.logits, without.logits), "the token types change the answer"
