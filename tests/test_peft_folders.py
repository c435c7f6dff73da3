"""Plain PEFT LoRA folders (what ``save_pretrained`` writes) read as ``lora`` adapters: PEFT's own
logits, labels, and a reason for every folder that cannot be served. Tiny random BERT, in process."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import batch, peft_lora_folder, randomize_adapter, spread_routers, tiny_model
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForSequenceClassification

from cogalora import ALL_MODULE_KINDS, CheckpointError, CoGaLoRAConfig, FlopModel, load_model, read_adapter, read_meta
from cogalora.checkpoint import ADAPTER_FILE, PEFT_CONFIG_FILE
from cogalora.peft_folder import SIDECAR_FILE
from service.repository import ModelRepository

#: Every Linear of BERT but the head: the six site kinds and the pooler (PEFT's "all-linear").
ALL_LINEAR = "all-linear"


def peft_logits(base: Path, folder: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits of PEFT's own PeftModel loaded from ``folder``, each row run alone (no padding)."""
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    labels = load_file(str(folder / ADAPTER_FILE))["base_model.model.classifier.weight"].shape[0]
    fresh = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=labels, ignore_mismatched_sizes=True
    )
    model = PeftModel.from_pretrained(fresh, folder).eval()
    assert model.peft_config["default"].r == config["r"]
    rows = []
    with torch.no_grad():
        for row, row_mask in zip(ids, mask, strict=True):
            length = int(row_mask.sum())
            rows.append(model(input_ids=row[None, :length], attention_mask=row_mask[None, :length]).logits[0])
    return torch.stack(rows)


@pytest.mark.parametrize(
    "lora",
    [
        pytest.param({"r": 4, "target_modules": ["query", "value"]}, id="r4-query-value"),
        pytest.param({"r": 16, "lora_alpha": 8, "target_modules": ALL_LINEAR}, id="r16-all-linear"),
        pytest.param(
            {
                "r": 8,
                "target_modules": ["query", "key", "dense"],
                "rank_pattern": {"layer.0.attention.self.query": 2, "pooler.dense": 4},
                "alpha_pattern": {"key": 3},
            },
            id="rank-and-alpha-patterns",
        ),
        pytest.param({"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ALL_LINEAR}, id="rslora"),
    ],
)
def test_peft_folder_gives_peft_logits_alone_and_in_a_mixed_batch(tiny_base_dir, tmp_path, lora):
    folder = tmp_path / "peft"
    peft_lora_folder(tiny_base_dir, folder, **lora)
    ids, mask = batch([4, 11, 7, 2, 9], seed=6)
    expected = peft_logits(tiny_base_dir, folder, ids, mask)

    loaded = load_model(folder)  # the library's own loader reads PEFT folders too
    assert loaded.meta.method == "lora"
    with torch.no_grad():
        alone = loaded.model(ids, mask).logits
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=0)

    # As the service holds it: every site kind injected, beside a routed CoGaLoRA adapter of another width.
    meta, weights = read_adapter(folder)
    other = tiny_model(CoGaLoRAConfig(rank=8, router_init_bias=0.0), labels=("a", "b"), seed=1)
    randomize_adapter(other, seed=5)
    spread_routers(other)
    shared = tiny_model(CoGaLoRAConfig(rank=8, target_modules=ALL_MODULE_KINDS), seed=0).eval()
    shared.set_adapter(0, weights, meta.labels)
    shared.set_adapter(1, other.adapter_weights(), ["a", "b"])
    slots = [0, 1, 0, 1, 0]
    with torch.no_grad():
        mixed = shared(ids, mask, slots=slots).logits
        solo_other = shared(ids, mask, slots=[1] * 5).logits
    for row, slot in enumerate(slots):
        if slot == 0:
            torch.testing.assert_close(mixed[row, :3], expected[row], atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(mixed[row, :2], solo_other[row, :2], atol=1e-5, rtol=0)


def test_patterns_and_rslora_give_each_module_its_own_scaling(tiny_base_dir, tmp_path):
    folder = tmp_path / "peft"
    peft_lora_folder(
        tiny_base_dir,
        folder,
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=ALL_LINEAR,
        rank_pattern={"layer.0.attention.self.query": 2},
        alpha_pattern={"value": 4},
    )
    meta, weights = read_adapter(folder, data=False)
    query0, value1 = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"
    assert tuple(weights.lora[query0][0].shape) == (2, 32)
    assert weights.scaling == pytest.approx(16 / math.sqrt(8))
    assert weights.scaling_at(query0) == pytest.approx(16 / math.sqrt(2))
    assert weights.scaling_at(value1) == pytest.approx(4 / math.sqrt(8))
    assert "bert.pooler.dense" in weights.lora
    assert meta.target_modules == list(ALL_MODULE_KINDS) and len(meta.sites) == 12
    assert (meta.rank, meta.alpha, meta.method, meta.training["source"]) == (8, 16.0, "lora", "peft")


def test_pooler_adapter_flops_are_counted(tiny_base_dir, tmp_path):
    """The pooler's LoRA costs 2 r (d_in + d_out) per example, as torch's FLOP counter sees it."""
    peft_lora_folder(tiny_base_dir, tmp_path / "peft", r=4, target_modules=ALL_LINEAR)
    model = load_model(tmp_path / "peft", attn_implementation="eager").model  # counted attention, as on CPU
    pooler = model.pooler_layers["bert.pooler.dense"]
    ids, mask = batch([9], seed=2)

    def counted() -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(ids, mask)
        return counter.get_total_flops()

    with_pooler, flops = counted(), FlopModel.for_slot(model).request(9, model.site_present())
    delta = read_adapter(tmp_path / "peft")[1].lora["bert.pooler.dense"]
    pooler.reset_slot(0)
    without_pooler, flops_without = counted(), FlopModel.for_slot(model).request(9, model.site_present())
    assert with_pooler - without_pooler == flops.total - flops_without.total == 2 * 4 * (32 + 32)
    assert flops.adapter - flops_without.adapter == 2 * 4 * 64
    assert abs(flops.total - with_pooler) <= 0.02 * with_pooler
    pooler.set_slot(0, *delta, scaling=2.0)
    assert FlopModel.for_slot(model).pooler_adapter_per_example == 2 * 4 * 64


@pytest.mark.parametrize("saved_as", ["classifier", "classifier.modules_to_save.default", "classifier.modules_to_save"])
def test_head_is_read_from_either_modules_to_save_layout(tiny_base_dir, tmp_path, saved_as):
    folder = tmp_path / "peft"
    peft_lora_folder(tiny_base_dir, folder, r=4, target_modules=["query"])
    path = folder / ADAPTER_FILE
    tensors = load_file(str(path))
    head = {part: tensors.pop(f"base_model.model.classifier.{part}") for part in ("weight", "bias")}
    for part, tensor in head.items():
        tensors[f"base_model.model.{saved_as}.{part}"] = tensor
    save_file(tensors, str(path))
    weights = read_adapter(folder)[1]
    assert torch.equal(weights.head["classifier"][0], head["weight"])


def test_labels_come_from_config_json_then_serving_json_then_defaults(tiny_base_dir, tmp_path):
    folder = tmp_path / "peft"
    peft_lora_folder(tiny_base_dir, folder, r=4, target_modules=["query"])
    assert read_meta(folder).labels == ["LABEL_0", "LABEL_1", "LABEL_2"]

    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}}))
    assert read_meta(folder).labels == ["LABEL_0", "LABEL_1", "LABEL_2"], "default names in config.json"
    (folder / SIDECAR_FILE).write_text(json.dumps({"labels": ["neg", "neutral", "pos"], "max_length": 16}))
    meta = read_meta(folder)
    assert (meta.labels, meta.max_length) == (["neg", "neutral", "pos"], 16)

    (folder / "config.json").write_text(json.dumps({"id2label": {"2": "pos", "0": "neg", "1": "neutral"}}))
    assert read_meta(folder).labels == ["neg", "neutral", "pos"], "named in both, and they agree"
    (folder / SIDECAR_FILE).unlink()
    assert read_meta(folder).labels == ["neg", "neutral", "pos"]

    (folder / SIDECAR_FILE).write_text(json.dumps({"labels": ["a", "b", "c"]}))
    with pytest.raises(CheckpointError, match="disagrees with id2label"):
        read_meta(folder)
    (folder / SIDECAR_FILE).write_text(json.dumps({"labels": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="lists 2 names, the head has 3"):
        read_meta(folder)
    (folder / SIDECAR_FILE).write_text(json.dumps({"labels": ["a", "b", "c"], "colour": "red"}))
    with pytest.raises(CheckpointError, match="colour"):
        read_meta(folder)


def test_serving_json_names_a_base_the_recorded_path_does_not(tiny_base_dir, tmp_path):
    folder = tmp_path / "peft"
    peft_lora_folder(tiny_base_dir, folder, r=4, target_modules=["query"])
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    config["base_model_name_or_path"] = "/home/someone/checkpoints/bert-tiny"  # where it was trained
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="cannot be found or read here"):
        read_meta(folder)
    (folder / SIDECAR_FILE).write_text(json.dumps({"base_model": str(tiny_base_dir)}))
    assert read_meta(folder).base_model == str(tiny_base_dir)


# ---- what cannot be served is listed, with a reason, and logged ------------------------------------


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    config.update(changes)
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / ADAPTER_FILE))
    edit(tensors)
    save_file(tensors, str(folder / ADAPTER_FILE))


def test_a_scan_serves_peft_folders_and_lists_every_other_one_with_its_reason(tiny_base_dir, tmp_path, caplog):
    root = tmp_path / "models"
    base = tiny_base_dir

    def good(name: str, **lora) -> Path:
        peft_lora_folder(base, root / name, **({"r": 4, "target_modules": ["query", "value"]} | lora))
        return root / name

    good("served")
    good("served-all-linear", r=16, target_modules=ALL_LINEAR)
    peft_lora_folder(base, root / "dora", r=4, target_modules=["query"], use_dora=True)
    peft_lora_folder(base, root / "biases", r=4, target_modules=["query"], bias="all")
    peft_lora_folder(base, root / "embeddings", r=4, target_modules=["word_embeddings"])
    _edit_config(good("ia3"), peft_type="IA3")
    _edit_config(good("causal"), task_type="CAUSAL_LM")
    _edit_config(good("nobase"), base_model_name_or_path="/nonexistent/bert-tiny")
    _edit_config(good("pissa"), init_lora_weights="pissa")
    _edit_tensors(good("head"), lambda t: t.update({"base_model.model.classifier.weight": torch.zeros(3, 16)}))

    def deeper(tensors):  # layer 7 of a 2-layer encoder
        for part in ("lora_A", "lora_B"):
            old = f"base_model.model.bert.encoder.layer.0.attention.self.query.{part}.weight"
            tensors[old.replace("layer.0", "layer.7")] = tensors.pop(old)

    _edit_tensors(good("nolayer"), deeper)
    pickled = good("pickled")
    (pickled / ADAPTER_FILE).rename(pickled / "adapter_model.bin")
    (root / "noconfig").mkdir()
    (good("tmp") / ADAPTER_FILE).rename(root / "noconfig" / ADAPTER_FILE)
    shutil.rmtree(root / "tmp")
    (root / "notes").mkdir()  # no adapter files at all: not an adapter folder
    (root / "notes" / "todo.md").write_text("x")

    repo = ModelRepository(root)
    with caplog.at_level(logging.WARNING, logger="service.repository"):
        failures = repo.scan()
    assert repo.names() == ["served", "served-all-linear"]
    reasons = {
        "dora": "DoRA",
        "biases": "bias='none'",
        "embeddings": "only lora_A / lora_B on Linear layers",
        "ia3": "'IA3' adapters are not served",
        "causal": "task_type='SEQ_CLS'",
        "nobase": "cannot be found or read here",
        "pissa": "path_initial_model_for_weight_conversion",
        "head": "head module 'classifier' has weight (3, 16)",
        "nolayer": "not a layer this service adapts",
        "pickled": "safe_serialization",
        "noconfig": "neither cogalora.json nor adapter_config.json",
    }
    assert sorted(failures) == sorted(reasons)
    for name, reason in reasons.items():
        assert reason in failures[name], (name, failures[name])
        assert str(tmp_path) not in failures[name], "client-facing reasons carry no server paths"
        assert any(name in record.getMessage() and reason in record.getMessage() for record in caplog.records)
    info = repo.info("served-all-linear")
    assert (info.method, info.labels, info.total_adapters) == ("lora", ["LABEL_0", "LABEL_1", "LABEL_2"], 12)
    assert repo.info("served").total_adapters == 4, "query and value in 2 layers"
