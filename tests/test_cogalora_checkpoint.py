"""Checkpoint round trips, PEFT compatibility and clear errors on damaged files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import batch, poison_weights, randomize_adapter
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from cogalora import (
    CheckpointError,
    CheckpointMeta,
    CoGaLoRAConfig,
    load_model,
    new_model,
    read_adapter,
    save_checkpoint,
)
from cogalora.checkpoint import ADAPTER_FILE, CONFIG_FILE, PEFT_CONFIG_FILE, ROUTER_FILE, update_meta


def _save(base_dir: Path, directory: Path, method: str = "cogalora", router_input_norm: str = "none") -> tuple:
    config = CoGaLoRAConfig(
        method=method, rank=4, router_init_bias=0.0, router_input_norm=router_input_norm, rank_set=(0, 2, 4)
    )
    model = new_model(str(base_dir), config, ["neg", "pos"])
    if method != "full":
        randomize_adapter(model)
    if method == "galora":
        with torch.no_grad():
            next(iter(model.gated_layers.values())).galora_gate.fill_(0.0)
        model.finalize_galora()
    model.eval()
    meta = CheckpointMeta(
        format_version=1,
        method=method,
        base_model=str(base_dir),
        labels=["neg", "pos"],
        max_length=32,
        rank=4,
        alpha=16.0,
        target_modules=list(model.config.target_modules),
        tau=0.5,
        router={"hidden": 4} if config.has_routers else None,
        metrics={"accuracy": 0.5},
        **{"lambda": 0.1},
    )
    save_checkpoint(model, directory, meta)
    return model, meta


@pytest.mark.parametrize("method", ["cogalora", "radlora", "lora", "galora", "full"])
def test_save_load_round_trip_gives_identical_outputs(tiny_base_dir, tmp_path, method):
    model, _ = _save(tiny_base_dir, tmp_path / method, method)
    loaded = load_model(tmp_path / method)
    ids, mask = batch([7, 3, 5], seed=1)
    with torch.no_grad():
        expected, actual = model(ids, mask), loaded.model(ids, mask)
    assert torch.equal(expected.logits, actual.logits)
    assert torch.equal(expected.gates, actual.gates)
    assert loaded.meta.labels == ["neg", "pos"] and loaded.meta.method == method
    files = {path.name for path in (tmp_path / method).iterdir()}
    assert (ROUTER_FILE in files) == (method in ("cogalora", "radlora"))
    assert torch.equal(expected.ranks, actual.ranks)
    if method == "radlora":
        assert loaded.meta.rank_set == [0, 2, 4] and loaded.model.config.rank_set == (0, 2, 4)
        assert len(read_adapter(tmp_path / method)[1].routers) == len(model.sites)
    if method == "galora":
        assert len(loaded.meta.sites) == len(model.sites) - 1


@pytest.mark.parametrize("method", ["cogalora", "radlora", "galora"])
def test_peft_loads_the_checkpoint_and_matches_all_gates_on(tiny_base_dir, tmp_path, method):
    model, _ = _save(tiny_base_dir, tmp_path / "ckpt", method)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_base_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ckpt").eval()
    ids, mask = batch([6, 4], seed=2)
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids, attention_mask=mask).logits
        ours = model(ids, mask, force_gates="on").logits
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=0)


def test_update_meta_validates_and_persists(tiny_base_dir, tmp_path):
    _save(tiny_base_dir, tmp_path / "c")
    assert update_meta(tmp_path / "c", tau=0.7).tau == 0.7
    assert load_model(tmp_path / "c").meta.tau == 0.7
    with pytest.raises(CheckpointError, match="tau"):
        update_meta(tmp_path / "c", tau=3.0)


def _corrupt(directory: Path, name: str, mutate) -> None:
    path = directory / name
    if name.endswith(".json"):
        data = json.loads(path.read_text())
        mutate(data)
        path.write_text(json.dumps(data))
    else:
        mutate(path)


@pytest.mark.parametrize(
    ("file", "mutate", "message"),
    [
        (CONFIG_FILE, lambda d: d.pop("labels"), r"cogalora\.json: field 'labels'"),
        (CONFIG_FILE, lambda d: d.update(rank=5), r"adapter_config\.json: field 'r'"),
        (CONFIG_FILE, lambda d: d.update(format_version=99), r"cogalora\.json: field 'format_version'"),
        (CONFIG_FILE, lambda d: d.update(labels=["a", "b", "c"]), r"adapter_model\.safetensors.*'labels'"),
        (PEFT_CONFIG_FILE, lambda d: d.update(r=2), r"adapter_config\.json: field 'r'"),
        (ADAPTER_FILE, lambda p: p.write_bytes(p.read_bytes()[:100]), r"adapter_model\.safetensors: not a readable"),
        (ROUTER_FILE, lambda p: p.unlink(), r"routers\.safetensors: file not found"),
        (CONFIG_FILE, lambda d: d.update(router=None), r"field 'router'"),
    ],
)
def test_damaged_checkpoints_fail_with_file_and_field(tiny_base_dir, tmp_path, file, mutate, message):
    _save(tiny_base_dir, tmp_path / "c")
    _corrupt(tmp_path / "c", file, mutate)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "c")


def test_not_json_and_wrong_shapes_are_reported(tiny_base_dir, tmp_path):
    _save(tiny_base_dir, tmp_path / "c")
    (tmp_path / "c" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cogalora\.json: not valid JSON"):
        read_adapter(tmp_path / "c")

    # An adapter trained on another base (wider hidden size) must not load silently.
    _save(tiny_base_dir, tmp_path / "d")
    _meta, weights = read_adapter(tmp_path / "d")
    path = next(iter(weights.lora))
    lora_A, _lora_B = weights.lora[path]
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "d" / ADAPTER_FILE))
    tensors[f"base_model.model.{path}.lora_A.weight"] = torch.zeros(4, lora_A.shape[1] + 1)
    save_file(tensors, str(tmp_path / "d" / ADAPTER_FILE))
    with pytest.raises(CheckpointError, match=r"shapes .* base model needs"):
        load_model(tmp_path / "d")


@pytest.mark.parametrize(("file", "bad_value"), [(ADAPTER_FILE, float("nan")), (ROUTER_FILE, float("-inf"))])
def test_weights_that_are_not_finite_are_refused_naming_the_tensor(tiny_base_dir, tmp_path, file, bad_value):
    """A NaN or an infinity in an adapter's or a router's weights would answer with NaN scores: refused on
    reading, with the file, the tensor and the count; the same file read as headers only (a scan) passes."""
    _save(tiny_base_dir, tmp_path / "c")
    key = poison_weights(tmp_path / "c" / file, value=bad_value, count=3)
    with pytest.raises(
        CheckpointError, match=rf"{file}: tensor '{re.escape(key)}' holds 3 of \d+ values that are not finite"
    ):
        read_adapter(tmp_path / "c")
    read_adapter(tmp_path / "c", data=False)


def test_only_safetensors_and_json_are_read(tiny_base_dir, tmp_path):
    """A pickle beside the checkpoint is ignored, and a pickle in place of safetensors is rejected."""
    _save(tiny_base_dir, tmp_path / "c")
    torch.save({"x": 1}, tmp_path / "c" / "extra.bin")
    load_model(tmp_path / "c")
    torch.save({"x": 1}, tmp_path / "c" / ADAPTER_FILE)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "c")


def test_router_input_norm_round_trips_and_older_checkpoints_default_to_none(tiny_base_dir, tmp_path):
    # The caller's meta says nothing about normalisation: the saved spec follows the routers themselves.
    model, _ = _save(tiny_base_dir, tmp_path / "normed", router_input_norm="layer_norm")
    spec = json.loads((tmp_path / "normed" / CONFIG_FILE).read_text())["router"]
    assert spec["input_norm"] == "layer_norm"
    loaded = load_model(tmp_path / "normed")
    assert loaded.meta.to_config().router_input_norm == "layer_norm"
    ids, mask = batch([7, 3, 5], seed=1)
    with torch.no_grad():
        expected, actual = model(ids, mask), loaded.model(ids, mask)
    assert torch.equal(expected.gates, actual.gates)
    torch.testing.assert_close(expected.gate_probs, actual.gate_probs, atol=1e-6, rtol=0)

    _save(tiny_base_dir, tmp_path / "old")
    path = tmp_path / "old" / CONFIG_FILE
    data = json.loads(path.read_text())
    del data["router"]["input_norm"]  # as written before the field existed
    path.write_text(json.dumps(data))
    meta, weights = read_adapter(tmp_path / "old")
    assert meta.router.input_norm == "none"
    assert {router.input_norm for router in weights.routers.values()} == {"none"}
    data["router"]["input_norm"] = "batch_norm"
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"router\.input_norm"):
        read_adapter(tmp_path / "old")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("rank_set"), r"cogalora\.json: field 'rank_set': required"),
        (lambda d: d.update(rank_set=[0, 2, 8]), r"cogalora\.json: field 'rank_set'.*\[0, 4\]"),
        (lambda d: d.update(rank_set=[0, 4]), r"routers\.safetensors: tensor .*rank_w has shape"),
        (lambda d: d.update(method="cogalora"), r"routers\.safetensors: unexpected tensor .*rank_"),
    ],
)
def test_radlora_rank_set_and_rank_heads_are_checked(tiny_base_dir, tmp_path, mutate, message):
    _save(tiny_base_dir, tmp_path / "r", "radlora")
    _corrupt(tmp_path / "r", CONFIG_FILE, mutate)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "r")
