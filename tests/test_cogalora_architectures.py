"""Injection into BERT-family encoders and base-model resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import batch
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from cogalora import PACKAGED_MODEL_ID, CoGaLoRAConfig, CoGaLoRAModel, FlopModel, resolve_base_model

_SMALL = dict(vocab_size=80, max_position_embeddings=70, num_labels=3)


def _roberta():
    return RobertaForSequenceClassification(
        RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **_SMALL)
    )


def _distilbert():
    return DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **_SMALL))


@pytest.mark.parametrize("factory", [_roberta, _distilbert], ids=["roberta", "distilbert"])
def test_other_families_get_all_six_module_kinds_per_layer(factory):
    torch.manual_seed(0)
    model = CoGaLoRAModel(factory().eval(), CoGaLoRAConfig(rank=2, router_init_bias=0.0))
    model.prepare_for_training(["a", "b", "c"])
    assert [site.name for site in model.sites[:6]] == [
        "layer.0.attention.query",
        "layer.0.attention.key",
        "layer.0.attention.value",
        "layer.0.attention.output",
        "layer.0.ffn.up",
        "layer.0.ffn.down",
    ]
    assert len(model.sites) == 12
    model.eval()
    ids, mask = batch([5, 3], vocab=70)
    with torch.no_grad():
        out = model(ids, mask, force_gates="on")
    assert out.logits.shape == (2, 3)
    assert out.adapter_rows == 2 * 12
    assert FlopModel.for_slot(model).head_per_example > 0


def test_target_module_subset():
    torch.manual_seed(0)
    model = CoGaLoRAModel(_roberta(), CoGaLoRAConfig(target_modules=("attention.value", "ffn.down")))
    assert [site.name for site in model.sites] == [
        "layer.0.attention.value",
        "layer.0.ffn.down",
        "layer.1.attention.value",
        "layer.1.ffn.down",
    ]


def test_unsupported_model_type_names_itself():
    model = GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50))
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        CoGaLoRAModel(model, CoGaLoRAConfig())


def test_config_rejects_unknown_values():
    with pytest.raises(ValueError, match="unknown target modules"):
        CoGaLoRAConfig(target_modules=("attention.q",))
    with pytest.raises(ValueError, match="method"):
        CoGaLoRAConfig(method="prefix")
    with pytest.raises(ValueError, match="tau"):
        CoGaLoRAConfig(tau=1.5)


def test_base_model_resolution(tmp_path):
    assert resolve_base_model(str(tmp_path)) == str(tmp_path)
    packaged = Path(resolve_base_model(PACKAGED_MODEL_ID))
    assert (packaged / "config.json").is_file() and (packaged / "model.safetensors").is_file()
    assert resolve_base_model("bert-base-uncased") == "bert-base-uncased"
