"""Model repository: catalogue, name safety, broken checkpoints, one shared encoder, lazy loading, LRU."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import batch, peft_lora_folder, poison_weights, synthetic_checkpoint, tiny_bert_config
from transformers import BertForSequenceClassification

from cogalora import ALL_MODULE_KINDS, CoGaLoRAConfig, CoGaLoRAModel
from service.encoders import share_frozen_base
from service.errors import (
    AdapterCapacityError,
    AdapterConflictError,
    AdapterLoadError,
    AdapterRequiredError,
    InvalidRequestError,
    UnknownAdapterError,
)
from service.repository import ModelRepository


@pytest.fixture
def model_dir(tmp_path: Path, tiny_base_dir: Path) -> Path:
    root = tmp_path / "models"
    base = str(tiny_base_dir)
    synthetic_checkpoint(root / "alpha", base, ["neg", "pos"], seed=0)
    synthetic_checkpoint(root / "beta", base, ["a", "b", "c"], seed=3)
    synthetic_checkpoint(root / "plain", base, ["neg", "pos"], method="lora", seed=5)
    (root / "README.md").write_text("not a checkpoint\n")
    (root / "notes").mkdir()  # a folder without cogalora.json is not a checkpoint: ignored
    return root


def copies(root: Path, source: Path, count: int, prefix: str = "a") -> list[str]:
    """``count`` copies of a checkpoint folder under ``root`` (cheap: the tiny checkpoints are small)."""
    names = [f"{prefix}{i:03d}" for i in range(count)]
    for name in names:
        shutil.copytree(source, root / name)
    return names


def test_scan_catalogues_without_loading_and_loads_share_one_encoder(model_dir: Path) -> None:
    repo = ModelRepository(model_dir)
    assert repo.scan() == {}
    assert repo.names() == ["alpha", "beta", "plain"]
    assert repo.loaded_names() == [] and repo.encoders() == [], "a scan reads metadata only"
    info = repo.info("beta")
    assert (info.labels, info.method) == (["a", "b", "c"], "cogalora")
    assert info.total_adapters == 12  # 2 layers x 6 module kinds
    assert info.max_length == 64  # capped by the tiny encoder's 64 positions
    assert info.metrics["synthetic"] is True

    assert repo.preload(10) == ["alpha", "beta", "plain"]
    assert len(repo.encoders()) == 1
    encoder = repo.encoders()[0]
    assert sorted(encoder.slots.values()) == ["alpha", "beta", "plain"]
    assert "beta" in repo.loaded_names()
    pinned = [repo.acquire(name) for name in repo.names()]
    assert len({adapter.slot for adapter in pinned}) == 3
    assert all(adapter.encoder is encoder for adapter in pinned)


def test_resolve_names_the_adapter_a_request_means(model_dir: Path, tiny_base_dir: Path) -> None:
    repo = ModelRepository(model_dir)
    repo.scan()
    assert repo.resolve("beta") == "beta"
    with pytest.raises(AdapterRequiredError):
        repo.resolve(None)
    with pytest.raises(UnknownAdapterError):
        repo.resolve("gamma")
    single = model_dir.parent / "single"
    synthetic_checkpoint(single / "only", str(tiny_base_dir), ["neg", "pos"], seed=1)
    lonely = ModelRepository(single)
    lonely.scan()
    assert lonely.resolve(None) == "only"


def test_broken_checkpoints_are_reported_and_skipped(model_dir: Path, tiny_base_dir: Path) -> None:
    (model_dir / "badjson").mkdir()
    (model_dir / "badjson" / "cogalora.json").write_text("{not json")
    truncated = synthetic_checkpoint(model_dir / "truncated", str(tiny_base_dir), ["neg", "pos"], seed=7)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    synthetic_checkpoint(model_dir / "fullft", str(tiny_base_dir), ["neg", "pos"], method="full", seed=8)
    synthetic_checkpoint(model_dir / "hyper", str(tiny_base_dir), ["neg", "pos"], method="hyperlora", seed=8)
    meta_path = model_dir / "wrongbase" / "cogalora.json"
    synthetic_checkpoint(model_dir / "wrongbase", str(tiny_base_dir), ["neg", "pos"], seed=9)
    meta = json.loads(meta_path.read_text())
    meta["base_model"] = str(model_dir / "does-not-exist")
    meta_path.write_text(json.dumps(meta))

    repo = ModelRepository(model_dir)
    failures = repo.scan()
    assert sorted(failures) == ["badjson", "fullft", "hyper", "truncated", "wrongbase"]
    assert repo.names() == ["alpha", "beta", "plain"]
    assert "not valid JSON" in failures["badjson"]
    assert "safetensors" in failures["truncated"], "weight headers are checked by the scan"
    assert "'full'" in failures["fullft"] and "cannot share a base model" in failures["fullft"]
    assert "cannot be loaded" in failures["wrongbase"]
    assert "'hyperlora'" in failures["hyper"] and "does not serve" in failures["hyper"]
    assert repo.failures == failures
    for message in failures.values():
        assert str(model_dir) not in message, "client-facing messages must not leak server paths"
    with pytest.raises(AdapterLoadError, match="cannot share a base model"):
        repo.load("fullft")
    with pytest.raises(AdapterLoadError, match="does not serve"):
        repo.load("hyper")
    with pytest.raises(AdapterLoadError, match=r"^adapter 'badjson' failed to load: badjson/cogalora\.json: not valid"):
        repo.acquire("badjson")  # it exists and failed: not "unknown adapter"


def test_weights_damaged_after_the_scan_fail_their_own_requests_only(model_dir: Path) -> None:
    repo = ModelRepository(model_dir)
    repo.scan()
    good = repo.acquire("alpha")
    weights = model_dir / "beta" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # header intact, data cut short
    with pytest.raises(AdapterLoadError, match="beta") as failure:
        repo.acquire("beta")
    assert str(model_dir) not in failure.value.message
    with pytest.raises(AdapterLoadError):  # fails fast until an admin reloads the folder
        repo.try_acquire("beta")
    assert "beta" in repo.failures
    assert repo.is_current(good) and repo.acquire("plain").name == "plain"
    assert repo.loaded_names() == ["alpha", "plain"]


def test_an_adapter_whose_weights_hold_a_nan_is_refused_and_the_others_serve(model_dir: Path) -> None:
    """A NaN in the weights passes the header-only scan, then fails its load (422, naming the tensor) instead
    of answering every routed input with NaN scores and an arbitrary label."""
    key = poison_weights(model_dir / "beta" / "adapter_model.safetensors", "lora_B")
    repo = ModelRepository(model_dir)
    assert "beta" not in repo.scan()
    with pytest.raises(AdapterLoadError, match=rf"beta.*{key}.*1 of \d+ values that are not finite") as failure:
        repo.acquire("beta")
    assert failure.value.status_code == 422 and str(model_dir) not in failure.value.message
    assert "beta" in repo.failures
    assert repo.acquire("alpha").name == "alpha"


@pytest.mark.parametrize("name", ["../alpha", "alpha/../beta", ".hidden", "", "a" * 65, "a b", "/etc", "al\x00pha"])
def test_bad_names_are_rejected(model_dir: Path, name: str) -> None:
    repo = ModelRepository(model_dir)
    with pytest.raises(InvalidRequestError):
        repo.load(name)


def test_symlink_escaping_the_model_dir_is_rejected(model_dir: Path, tmp_path: Path, tiny_base_dir: Path) -> None:
    outside = synthetic_checkpoint(tmp_path / "outside", str(tiny_base_dir), ["neg", "pos"], seed=1)
    os.symlink(outside, model_dir / "escape")
    repo = ModelRepository(model_dir)
    with pytest.raises(InvalidRequestError, match="outside"):
        repo.load("escape")
    repo.scan()
    assert "escape" not in repo.names()


def test_unknown_names(model_dir: Path) -> None:
    repo = ModelRepository(model_dir)
    with pytest.raises(UnknownAdapterError):
        repo.load("missing")
    with pytest.raises(UnknownAdapterError):
        repo.load("notes")  # a folder, but not a checkpoint
    with pytest.raises(UnknownAdapterError):
        repo.info("alpha")  # on disk, but not scanned yet
    with pytest.raises(UnknownAdapterError):
        repo.unload("alpha")


def test_admin_load_unload_and_replace(model_dir: Path) -> None:
    repo = ModelRepository(model_dir)
    repo.load("alpha")
    encoder = repo.encoders()[0]
    alpha = repo.acquire("alpha")
    repo.release(alpha)
    with pytest.raises(AdapterConflictError):
        repo.load("alpha")
    repo.load("beta")
    assert repo.names() == ["alpha", "beta"] and repo.loaded_names() == ["alpha", "beta"]
    assert len(repo.encoders()) == 1, "a second adapter on the same base reuses the loaded encoder"

    repo.unload("alpha")
    assert repo.names() == ["beta"], "an unloaded adapter is not servable until loaded again"
    assert not any(encoder.model.site_present(alpha.slot)), "an unloaded slot keeps no adapter weights"
    assert not repo.is_current(alpha)
    with pytest.raises(UnknownAdapterError):
        repo.acquire("alpha")

    assert repo.load("alpha").name == "alpha"
    reloaded = repo.acquire("alpha")
    assert reloaded.generation != alpha.generation
    assert reloaded.slot == alpha.slot, "freed slots are reused"
    repo.release(reloaded)

    assert repo.load("alpha", replace=True).name == "alpha"
    replaced = repo.acquire("alpha")
    assert replaced.generation != reloaded.generation and not repo.is_current(reloaded)
    assert sorted(encoder.slots.values()) == ["alpha", "beta"]


def test_an_unexpected_error_in_one_folder_does_not_stop_the_others(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.catalogue as catalogue_module

    real_read_adapter = catalogue_module.read_adapter

    def flaky_read_adapter(directory, data=True):
        if Path(directory).name == "beta":
            raise RuntimeError("simulated crash inside a library")
        return real_read_adapter(directory, data)

    monkeypatch.setattr(catalogue_module, "read_adapter", flaky_read_adapter)
    repo = ModelRepository(model_dir)
    failures = repo.scan()
    assert list(failures) == ["beta"] and "simulated crash" in failures["beta"]
    assert repo.names() == ["alpha", "plain"]


# ---- bounded memory: lazy loads, least-recently-used eviction, pins -------------------------------


def test_lru_keeps_at_most_max_loaded_and_evicts_the_least_recently_used_idle_one(
    model_dir: Path, tiny_base_dir: Path
) -> None:
    names = copies(model_dir, model_dir / "alpha", 3, prefix="extra")
    repo = ModelRepository(model_dir, max_loaded=2)
    repo.scan()
    for name in ("alpha", "beta"):
        repo.release(repo.acquire(name))
    repo.release(repo.acquire("alpha"))  # alpha is now the most recently used
    repo.release(repo.acquire(names[0]))
    assert repo.loaded_names() == ["alpha", names[0]], "beta, least recently used, was evicted"

    held = repo.acquire("alpha")  # pinned: must survive whatever else loads
    for name in [*names[1:], "plain", "beta"]:
        adapter = repo.acquire(name)
        assert "alpha" in repo.loaded_names() and len(repo.loaded_names()) <= 2
        repo.release(adapter)
    assert repo.is_current(held)
    repo.release(held)


def test_a_load_waits_while_every_loaded_adapter_is_pinned(model_dir: Path) -> None:
    repo = ModelRepository(model_dir, max_loaded=1)
    repo.scan()
    held = repo.acquire("alpha")
    with pytest.raises(AdapterCapacityError) as busy:
        repo.acquire("beta", timeout=0.05)
    assert busy.value.retry_after is not None
    outcome: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: outcome.update(beta=repo.acquire("beta", timeout=30)))
    waiter.start()
    repo.release(held)  # the waiting load may now evict alpha
    waiter.join(timeout=30)
    assert outcome["beta"].name == "beta" and repo.loaded_names() == ["beta"]
    assert not repo.is_current(held)


def test_storage_follows_what_each_adapter_has_and_rows_are_reused(model_dir: Path, tiny_base_dir: Path) -> None:
    repo = ModelRepository(model_dir)
    repo.scan()
    for name in repo.names():
        repo.release(repo.acquire(name))
    model = repo.encoders()[0].model
    rows_used = [sum(bank.rows_used for bank in layer.banks) for layer in model.layers]
    assert rows_used == [3] * len(model.layers), "three adapters, each on every site"

    # An adapter that has only some sites takes rows only there.
    synthetic_checkpoint(model_dir / "pruned", str(tiny_base_dir), ["neg", "pos"], seed=4, keep_sites=3)
    repo.load("pruned")
    now = [sum(bank.rows_used for bank in layer.banks) for layer in model.layers]
    assert sum(now) - sum(rows_used) == 3, "the pruned adapter stores its 3 sites, not all 12"
    assert repo.info("pruned").total_adapters == 12, "dropped sites count as off, not as absent"

    capacity = [bank.capacity for layer in model.layers for bank in layer.banks]
    repo.unload("alpha")
    repo.load("alpha")
    assert [bank.capacity for layer in model.layers for bank in layer.banks] == capacity, "released rows are reused"


def test_scan_of_300_folders_loads_only_what_is_asked(tmp_path: Path, tiny_base_dir: Path) -> None:
    root = tmp_path / "many"
    source = synthetic_checkpoint(tmp_path / "source", str(tiny_base_dir), ["neg", "pos"], seed=2)
    names = copies(root, source, 300)
    repo = ModelRepository(root, max_loaded=50)
    assert repo.scan() == {}
    assert repo.names() == names and repo.loaded_names() == []
    repo.load_encoders()
    assert repo.preload(16) == names[:16]
    assert repo.acquire(names[299]).name == names[299], "any other adapter loads on demand"


# ---- lanes: one frozen encoder, adapters per lane -------------------------------------------------


def _tensors(model: CoGaLoRAModel) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _outputs(model: CoGaLoRAModel, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = batch([5, 9, 3, 12, 7, 9][: len(slots)], seed=4)
    with torch.inference_mode():
        output = model(ids, mask, slots=slots, taus=[0.5] * len(slots))
    return output.logits, output.gates


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_lanes_share_the_frozen_encoder_and_keep_their_own_adapters(
    model_dir: Path, tiny_base_dir: Path, precision: str
) -> None:
    # A PEFT folder over every Linear also puts LoRA on the pooler, outside the gated sites.
    peft_lora_folder(tiny_base_dir, model_dir / "peft", num_labels=2, r=4, target_modules="all-linear")
    alone = ModelRepository(model_dir, precision=precision)
    lanes = ModelRepository(model_dir, precision=precision, lanes=3)
    for repo in (alone, lanes):
        repo.scan()
        for name in repo.names():
            repo.release(repo.acquire(name))
    encoder = lanes.encoders()[0]
    first, *others = encoder.lanes.models
    heads = tuple(f"model.{path}." for path in first.head_layers)

    def per_lane(name: str) -> bool:
        return ".banks." in name or name.startswith(heads) or not name.startswith("model.")

    assert any(".banks." in name for name, _ in _tensors(first)) and any(
        name.startswith("model.") and ".base." in name for name, _ in _tensors(first)
    )
    for model in others:
        assert [name for name, _ in _tensors(model)] == [name for name, _ in _tensors(first)]
        for (name, mine), (_, theirs) in zip(_tensors(model), _tensors(first), strict=True):
            assert (mine.data_ptr() == theirs.data_ptr()) != per_lane(name), name
        embeddings = model.model.get_submodule("bert.embeddings.word_embeddings").weight
        assert embeddings is first.model.get_submodule("bert.embeddings.word_embeddings").weight

    def answers(repo: ModelRepository, names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        encoder = repo.encoders()[0]
        slot_of = {name: slot for slot, name in encoder.slots.items()}
        slots = [slot_of[names[i % len(names)]] for i in range(6)]
        return [_outputs(model, slots) for model in encoder.lanes.models]

    def assert_alike(names: list[str]) -> None:
        (reference,) = answers(alone, names)
        for logits, gates in answers(lanes, names):
            assert torch.equal(logits, reference[0]) and torch.equal(gates, reference[1])

    everything = ["alpha", "beta", "plain", "peft"]
    assert_alike(everything)
    (beta,) = [slot for slot, name in encoder.slots.items() if name == "beta"]
    lanes.unload("beta")
    assert not any(any(model.site_present(beta)) for model in encoder.lanes.models), "removed from every lane"
    assert_alike(["alpha", "plain", "peft"])
    lanes.load("beta")
    assert_alike(everything)


def test_lanes_built_differently_are_not_shared() -> None:
    def serving_model(precision: str) -> CoGaLoRAModel:
        base = BertForSequenceClassification(tiny_bert_config()).eval()
        return CoGaLoRAModel(base, CoGaLoRAConfig(target_modules=ALL_MODULE_KINDS)).set_precision(precision)

    like = serving_model("int8")
    with pytest.raises(ValueError, match="differ"):
        share_frozen_base(serving_model("float32"), like)
    assert share_frozen_base(serving_model("int8"), like) > 0
