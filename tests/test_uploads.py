"""Runtime installs (service/uploads.py): hostile archives refused with nothing written, atomic installs and
removals, recovery after a crash, and replacements that let admitted requests finish on the old weights.
Tiny random BERT, in process; the real service over HTTP is tests/test_peft_service.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from archives import HOSTILE, pack
from conftest import batch, peft_lora_folder, synthetic_checkpoint
from safetensors.torch import load_file, save_file

from cogalora.checkpoint import ADAPTER_FILE, PEFT_CONFIG_FILE
from service import uploads
from service.errors import (
    AdapterConflictError,
    AdapterLoadError,
    AdapterSourceNotFoundError,
    AdapterSourceUnavailableError,
    InvalidRequestError,
    ModelDirReadOnlyError,
    ServiceError,
    UnknownAdapterError,
)
from service.repository import ModelRepository
from service.settings import Settings
from service.uploads import Installer, recover_interrupted


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) and the bytes of each file: to prove nothing was written."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.fixture
def peft_dir(tmp_path: Path, tiny_base_dir: Path) -> Path:
    """A good PEFT folder outside the model directory (the thing users pack and upload)."""
    peft_lora_folder(tiny_base_dir, tmp_path / "upload", r=4, target_modules=["query", "value"])
    return tmp_path / "upload"


@pytest.fixture
def model_dir(tmp_path: Path, tiny_base_dir: Path) -> Path:
    root = tmp_path / "models"
    synthetic_checkpoint(root / "alpha", str(tiny_base_dir), ["neg", "pos"], seed=0)
    return root


def install(installer: Installer, repo: ModelRepository, name: str, archive: bytes, replace: bool = False):
    """What ``PUT /adapters/{name}`` does, without HTTP: stage, check, commit; the staging folder never stays."""
    staged = installer.stage_archive(name, archive)
    try:
        installer.check(name, staged, repo.validate)
        return installer.commit(name, staged, replace, repo)
    finally:
        installer.discard(staged)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_nothing_is_written(case, tmp_path, model_dir, peft_dir):
    build, status = HOSTILE[case]
    before = tree(tmp_path)
    installer = Installer(model_dir, max_bytes=1 << 20)
    with pytest.raises(ServiceError) as refused:
        installer.stage_archive("incoming", build(peft_dir))
    assert refused.value.status_code == status, refused.value.message
    assert str(tmp_path) not in refused.value.message
    assert tree(tmp_path) == before, "nothing written, not even a staging folder"


def test_more_bytes_than_the_limit_are_refused_however_they_come(tmp_path, model_dir, peft_dir):
    size = (peft_dir / ADAPTER_FILE).stat().st_size
    installer = Installer(model_dir, max_bytes=size // 2)
    before = tree(tmp_path)
    for fmt in ("tar.gz", "zip"):
        with pytest.raises(ServiceError) as refused:
            installer.stage_archive("big", pack(peft_dir, fmt))
        assert refused.value.status_code == 413
    assert tree(tmp_path) == before


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
@pytest.mark.parametrize("top", [None, "my-adapter", "."])
def test_good_archives_unpack_to_the_adapter_files(fmt, top, model_dir, peft_dir):
    (peft_dir / "._adapter_config.json").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata: skipped
    staged = Installer(model_dir, max_bytes=1 << 20).stage_archive("incoming", pack(peft_dir, fmt, top))
    assert staged.parent == model_dir and staged.name.startswith(".staging-incoming-")
    expected = {p.name: p.read_bytes() for p in peft_dir.iterdir() if not p.name.startswith("._")}
    assert {p.name: p.read_bytes() for p in staged.iterdir()} == expected


def test_install_replace_and_remove_in_the_model_directory(model_dir, peft_dir, tiny_base_dir):
    repo = ModelRepository(model_dir)
    repo.scan()
    installer = Installer(model_dir, max_bytes=1 << 20)
    info = install(installer, repo, "peft", pack(peft_dir, "zip"))
    assert (info.name, info.method, info.labels) == ("peft", "lora", ["LABEL_0", "LABEL_1", "LABEL_2"])
    assert repo.names() == ["alpha", "peft"] and "peft" in repo.loaded_names()
    assert sorted(p.name for p in model_dir.iterdir()) == ["alpha", "peft"], "no staging folder left"

    other = peft_dir.parent / "other"
    peft_lora_folder(tiny_base_dir, other, num_labels=2, r=8, target_modules="all-linear", seed=3)
    (other / "serving.json").write_text(json.dumps({"labels": ["no", "yes"]}))
    before = tree(model_dir)
    with pytest.raises(AdapterConflictError, match="replace=true"):
        install(installer, repo, "peft", pack(other))
    assert tree(model_dir) == before and repo.info("peft").labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert install(installer, repo, "peft", pack(other), replace=True).labels == ["no", "yes"]
    assert (model_dir / "peft" / "serving.json").is_file()
    assert sorted(p.name for p in model_dir.iterdir()) == ["alpha", "peft"], "the old folder is gone"

    installer.remove("peft", repo.unload)
    assert repo.names() == ["alpha"] and sorted(p.name for p in model_dir.iterdir()) == ["alpha"]
    with pytest.raises(UnknownAdapterError):
        installer.remove("peft", repo.unload)


def test_a_broken_folder_listed_unavailable_can_be_removed(model_dir, peft_dir):
    shutil.copytree(peft_dir, model_dir / "broken")
    (model_dir / "broken" / ADAPTER_FILE).write_bytes(b"not safetensors")
    (model_dir / "notes").mkdir()
    repo = ModelRepository(model_dir)
    assert list(repo.scan()) == ["broken"]
    installer = Installer(model_dir, max_bytes=1 << 20)
    installer.remove("broken", repo.unload)
    assert repo.failures == {} and not (model_dir / "broken").exists()
    with pytest.raises(UnknownAdapterError):
        installer.remove("notes", repo.unload)  # a folder, but not an adapter's: left alone
    assert (model_dir / "notes").is_dir()


def test_an_archive_that_cannot_be_served_is_refused_before_it_is_visible(model_dir, peft_dir, tiny_base_dir):
    config = json.loads((peft_dir / PEFT_CONFIG_FILE).read_text())
    (peft_dir / PEFT_CONFIG_FILE).write_text(json.dumps(config | {"use_dora": True}))
    repo = ModelRepository(model_dir)
    repo.scan()
    before = tree(model_dir)
    with pytest.raises(AdapterLoadError) as refused:
        install(Installer(model_dir, max_bytes=1 << 20), repo, "dora", pack(peft_dir))
    assert "DoRA" in refused.value.message and "dora/adapter_config.json" in refused.value.message
    assert ".staging" not in refused.value.message and str(model_dir) not in refused.value.message
    assert tree(model_dir) == before and repo.names() == ["alpha"] and repo.failures == {}

    # A head the base cannot hold is caught by the load into a weightless base, before the rename.
    wide = synthetic_checkpoint(peft_dir.parent / "wide", str(tiny_base_dir), ["neg", "pos"], seed=2)
    tensors = load_file(str(wide / ADAPTER_FILE))
    tensors["base_model.model.classifier.weight"] = torch.zeros(2, 16)
    save_file(tensors, str(wide / ADAPTER_FILE))
    with pytest.raises(AdapterLoadError, match="do not fit a layer with 32 inputs"):
        install(Installer(model_dir, max_bytes=1 << 20), repo, "wide", pack(wide))
    assert tree(model_dir) == before


class FailingLoad:
    """A repository whose next load fails (a disk error, memory): the install must undo itself."""

    def __init__(self, repo: ModelRepository) -> None:
        self.repo, self.loads = repo, []
        self.validate, self.unload = repo.validate, repo.unload

    def load(self, name: str, replace: bool = False):
        self.loads.append((name, sorted(p.name for p in (self.repo.model_dir / name).iterdir())))
        if len(self.loads) == 1:
            raise AdapterLoadError("simulated failure")
        return self.repo.load(name, replace=replace)


def test_a_failed_load_puts_the_previous_folder_back(model_dir, peft_dir):
    repo = ModelRepository(model_dir)
    repo.scan()
    repo.load("alpha")
    before = tree(model_dir)
    installer = Installer(model_dir, max_bytes=1 << 20)
    failing = FailingLoad(repo)
    with pytest.raises(AdapterLoadError, match="simulated"):
        install(installer, failing, "alpha", pack(peft_dir), replace=True)
    assert tree(model_dir) == before, "the old folder is back, the new one gone"
    assert [files for _, files in failing.loads] == [
        sorted(os.listdir(peft_dir)),
        sorted(os.listdir(model_dir / "alpha")),
    ]
    assert repo.info("alpha").method == "cogalora" and repo.failures == {}


def test_recovery_finishes_or_undoes_what_a_crash_interrupted(model_dir, peft_dir):
    shutil.copytree(model_dir / "alpha", model_dir / ".replaced-alpha-0123456789ab")  # crashed mid-replace
    (model_dir / "alpha").rename(model_dir / ".replaced-gone-0123456789ab")  # crashed between the two renames
    shutil.copytree(peft_dir, model_dir / ".staging-new-0123456789ab")  # crashed while checking an upload
    shutil.copytree(peft_dir, model_dir / ".removed-old-0123456789ab")  # crashed while deleting
    shutil.copytree(model_dir / ".replaced-gone-0123456789ab", model_dir / "alpha")
    recover_interrupted(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == ["alpha", "gone"]
    repo = ModelRepository(model_dir)
    assert repo.scan() == {} and repo.names() == ["alpha", "gone"]


def test_a_read_only_model_directory_gets_a_clear_refusal(model_dir, peft_dir):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    model_dir.chmod(0o555)
    try:
        with pytest.raises(ModelDirReadOnlyError):
            Installer(model_dir, max_bytes=1 << 20).stage_archive("x", pack(peft_dir))
    finally:
        model_dir.chmod(0o755)


def test_hub_sources_come_from_the_local_cache_or_fail_clearly(tmp_path, model_dir, peft_dir, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    fill_hub_cache(cache, "acme/sst2-lora", commit, peft_dir)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    installer = Installer(model_dir, max_bytes=1 << 20)
    for revision in (None, "main", commit):
        staged, resolved = installer.stage_hub("sst2", "hf://acme/sst2-lora", revision)
        assert resolved == commit
        assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in peft_dir.iterdir())
        assert not any(p.is_symlink() for p in staged.iterdir()), "files are copied out of the cache"
        installer.discard(staged)
    before = tree(tmp_path)
    with pytest.raises(AdapterSourceUnavailableError, match="hf://acme/missing") as offline:
        installer.stage_hub("x", "hf://acme/missing", None)
    assert offline.value.status_code == 422
    with pytest.raises(AdapterSourceUnavailableError, match="revision v9"):
        installer.stage_hub("x", "hf://acme/sst2-lora", "v9")
    for source, revision in [("acme/sst2-lora", None), ("hf://../etc", None), ("hf://acme/x", "../../etc")]:
        with pytest.raises(InvalidRequestError):
            installer.stage_hub("x", source, revision)
    assert tree(tmp_path) == before
    assert issubclass(AdapterSourceNotFoundError, ServiceError) and AdapterSourceNotFoundError.status_code == 404


def fill_hub_cache(cache: Path, repo_id: str, commit: str, folder: Path) -> None:
    """A Hugging Face Hub cache (HF_HUB_CACHE layout) holding ``folder`` as ``repo_id`` at ``commit`` (= main):
    blobs, a snapshot of relative symlinks to them, and the ref, as ``snapshot_download`` leaves it."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        (repo / "blobs" / blob).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob)


def test_a_replacement_lets_admitted_requests_finish_on_the_old_weights(model_dir, tiny_base_dir):
    repo = ModelRepository(model_dir)
    repo.scan()
    admitted = repo.acquire("alpha")  # a request admitted before the replacement holds this pin
    model = admitted.encoder.model
    ids, mask = batch([5, 3], seed=1)
    with torch.no_grad():
        old_logits = model(ids, mask, slots=[admitted.slot] * 2).logits

    shutil.rmtree(model_dir / "alpha")
    synthetic_checkpoint(model_dir / "alpha", str(tiny_base_dir), ["neg", "pos"], seed=1)
    repo.load("alpha", replace=True)
    current = repo.acquire("alpha")
    assert current.slot != admitted.slot and current.generation != admitted.generation
    assert repo.is_current(admitted) and repo.is_current(current), "the admitted request may still run"
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, slots=[admitted.slot] * 2).logits, old_logits, atol=0, rtol=0)
        assert not torch.allclose(model(ids, mask, slots=[current.slot] * 2).logits, old_logits)
    repo.release(admitted)
    repo.release(current)
    synthetic_checkpoint(model_dir / "beta", str(tiny_base_dir), ["a", "b"], seed=2)
    repo.load("beta")  # the next admin operation frees the old slot, now that nobody holds it
    assert not repo.is_current(admitted)
    assert admitted.slot not in admitted.encoder.slots or admitted.encoder.slots[admitted.slot] != "alpha"
    assert sorted(admitted.encoder.slots.values()) == ["alpha", "beta"]


def test_under_ray_serve_installs_and_deletions_answer_409_and_change_nothing(model_dir, peft_dir):
    ingress = pytest.importorskip("service.ray_serve.ingress")
    settings = Settings(model_dir=model_dir)
    catalogue = ingress.CatalogueRepository(settings)
    service = SimpleNamespace(settings=settings, admin_lock=asyncio.Lock())
    before = tree(model_dir)
    with pytest.raises(AdapterConflictError, match="redeploy"):
        asyncio.run(uploads.install(service, catalogue, "new", False, archive=pack(peft_dir)))
    with pytest.raises(AdapterConflictError, match="redeploy"):
        asyncio.run(uploads.remove(service, catalogue, "alpha"))
    assert tree(model_dir) == before and catalogue.names() == ["alpha"]
