"""Model repository: discovery, name safety, broken checkpoints, one shared base, run-time load/unload."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import synthetic_checkpoint

from service.errors import AdapterConflictError, InvalidRequestError, UnknownAdapterError
from service.repository import AdapterLoadError, ModelRepository


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


def test_load_all_shares_one_base_model(model_dir: Path) -> None:
    repo = ModelRepository(model_dir)
    assert repo.load_all() == {}
    assert repo.names() == ["alpha", "beta", "plain"]
    assert len(repo.bases()) == 1
    base = repo.bases()[0]
    assert sorted(base.slots.values()) == ["alpha", "beta", "plain"]
    assert len({repo.get(name).slot for name in repo.names()}) == 3
    info = repo.info("beta")
    assert info.labels == ["a", "b", "c"]
    assert info.method == "cogalora"
    assert info.total_adapters == 12  # 2 layers x 6 module kinds
    assert info.site_names[0] == "layer.0.attention.query"
    assert info.max_length == 64  # capped by the tiny encoder's 64 positions
    assert info.metrics == {"synthetic": True}


def test_broken_checkpoints_are_reported_and_skipped(model_dir: Path, tiny_base_dir: Path) -> None:
    (model_dir / "badjson").mkdir()
    (model_dir / "badjson" / "cogalora.json").write_text("{not json")
    truncated = synthetic_checkpoint(model_dir / "truncated", str(tiny_base_dir), ["neg", "pos"], seed=7)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    synthetic_checkpoint(model_dir / "fullft", str(tiny_base_dir), ["neg", "pos"], method="full", seed=8)
    meta_path = model_dir / "wrongbase" / "cogalora.json"
    synthetic_checkpoint(model_dir / "wrongbase", str(tiny_base_dir), ["neg", "pos"], seed=9)
    meta = json.loads(meta_path.read_text())
    meta["base_model"] = str(model_dir / "does-not-exist")
    meta_path.write_text(json.dumps(meta))

    repo = ModelRepository(model_dir)
    failures = repo.load_all()
    assert sorted(failures) == ["badjson", "fullft", "truncated", "wrongbase"]
    assert repo.names() == ["alpha", "beta", "plain"]
    assert "not valid JSON" in failures["badjson"]
    assert "safetensors" in failures["truncated"]
    assert "'full'" in failures["fullft"] and "cannot share a base model" in failures["fullft"]
    assert repo.failures == failures
    for message in failures.values():
        assert str(model_dir) not in message, "client-facing messages must not leak server paths"
    with pytest.raises(AdapterLoadError, match="cannot share a base model"):
        repo.load("fullft")


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
    assert "escape" in repo.load_all()  # reported, never loaded
    assert "escape" not in repo.names()


def test_unknown_names(model_dir: Path) -> None:
    repo = ModelRepository(model_dir)
    with pytest.raises(UnknownAdapterError):
        repo.load("missing")
    with pytest.raises(UnknownAdapterError):
        repo.load("notes")  # a folder, but not a checkpoint
    with pytest.raises(UnknownAdapterError):
        repo.info("alpha")  # exists on disk, not loaded
    with pytest.raises(UnknownAdapterError):
        repo.unload("alpha")


def test_load_and_unload_at_run_time(model_dir: Path) -> None:
    repo = ModelRepository(model_dir)
    repo.load("alpha")
    base = repo.bases()[0]
    alpha = repo.get("alpha")
    with pytest.raises(AdapterConflictError):
        repo.load("alpha")
    repo.load("beta")
    assert repo.names() == ["alpha", "beta"]
    assert len(repo.bases()) == 1, "a second adapter on the same base reuses the loaded encoder"

    repo.unload("alpha")
    assert repo.names() == ["beta"]
    assert not any(base.model.site_present(alpha.slot)), "an unloaded slot keeps no adapter weights"
    assert not repo.is_current("alpha", alpha.generation)

    again = repo.load("alpha")
    assert again.name == "alpha"
    reloaded = repo.get("alpha")
    assert reloaded.generation != alpha.generation
    assert reloaded.slot == alpha.slot, "freed slots are reused"

    replaced = repo.load("alpha", replace=True)
    assert replaced.name == "alpha"
    assert repo.get("alpha").generation != reloaded.generation
    assert sorted(base.slots.values()) == ["alpha", "beta"]


def test_an_unexpected_error_in_one_folder_does_not_stop_the_others(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.repository as repository_module

    real_read_adapter = repository_module.read_adapter

    def flaky_read_adapter(directory):
        if Path(directory).name == "beta":
            raise RuntimeError("simulated crash inside a library")
        return real_read_adapter(directory)

    monkeypatch.setattr(repository_module, "read_adapter", flaky_read_adapter)
    repo = ModelRepository(model_dir)
    failures = repo.load_all()
    assert list(failures) == ["beta"] and "simulated crash" in failures["beta"]
    assert repo.names() == ["alpha", "plain"]
