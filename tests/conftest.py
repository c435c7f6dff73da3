"""Shared fixtures: tiny random BERT encoders built in code, so unit tests need no download and no data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from cogalora import CoGaLoRAConfig, CoGaLoRAModel

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_WORDS = [f"w{i}" for i in range(60)] + ["good", "bad", "great", "awful", "movie", "plot", "the", "a"]


def tiny_bert_config(num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=5 + len(_WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )


def tiny_model(config: CoGaLoRAConfig | None = None, labels: tuple[str, ...] = ("neg", "pos"), seed: int = 0):
    """A fresh CoGaLoRA model on a random 2-layer BERT, prepared for training in slot 0."""
    torch.manual_seed(seed)
    base = BertForSequenceClassification(tiny_bert_config(len(labels))).eval()
    model = CoGaLoRAModel(base, config or CoGaLoRAConfig(rank=4))
    model.prepare_for_training(list(labels))
    return model


def randomize_adapter(model: CoGaLoRAModel, seed: int = 1, slot: int = 0) -> None:
    """Give B non-zero values (fresh LoRA has B = 0, which would hide adapter bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.gated_layers.values():
            layer.lora_B[slot].copy_(torch.randn(layer.lora_B[slot].shape, generator=generator) * 0.5)


@pytest.fixture
def tiny_base_dir(tmp_path: Path) -> Path:
    """A tiny random BERT with a word-level tokenizer saved as a local Hugging Face directory."""
    torch.manual_seed(0)
    directory = tmp_path / "tiny-bert"
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(directory, safe_serialization=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(vocab=str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    return directory


def batch(lengths: list[int], vocab: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids right-padded to the longest length, and the attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(5, vocab, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


def synthetic_checkpoint(
    directory: Path,
    base_model: str,
    labels: list[str],
    method: str = "cogalora",
    seed: int = 0,
    router_bias: float = 0.0,
    max_length: int = 128,
) -> Path:
    """Save a deterministic, untrained-but-non-trivial adapter: random B, routers near p = 0.5.

    Routers with a zero output bias put gate probabilities on both sides of 0.5, so gates differ
    between inputs: what correctness tests need, independent of any training run.
    """
    from cogalora import CheckpointMeta, new_model, save_checkpoint

    torch.manual_seed(seed)
    config = CoGaLoRAConfig(method=method, rank=8, alpha=16.0, router_init_bias=router_bias)
    model = new_model(base_model, config, labels)
    randomize_adapter(model, seed=seed + 1)
    with torch.no_grad():
        for layer in model.gated_layers.values():
            layer.routers.w2.mul_(40.0)  # spread p well away from tau, so gates are not knife-edge
    meta = CheckpointMeta(
        format_version=1,
        method=method,
        base_model=base_model,
        labels=labels,
        max_length=max_length,
        rank=config.rank,
        alpha=config.alpha,
        target_modules=list(config.target_modules),
        tau=0.5,
        router={"hidden": config.router_hidden} if method == "cogalora" else None,
        metrics={"synthetic": True},
        **{"lambda": 0.0},
    )
    return save_checkpoint(model, directory, meta)


@pytest.fixture(scope="session")
def minilm_model_dir(tmp_path_factory) -> Path:
    """A model repository on the real packaged all-MiniLM-L6-v2: two routed adapters and a plain LoRA.

    ``sst2`` (negative/positive) and ``agnews`` (four topics) are CoGaLoRA, ``plain`` is LoRA.
    Weights are synthetic (seeded), so tests do not depend on a training run's outcome.
    """
    from cogalora import PACKAGED_MODEL_ID

    root = tmp_path_factory.mktemp("models")
    synthetic_checkpoint(root / "sst2", PACKAGED_MODEL_ID, ["negative", "positive"], seed=0)
    synthetic_checkpoint(root / "agnews", PACKAGED_MODEL_ID, ["World", "Sports", "Business", "Sci/Tech"], seed=10)
    synthetic_checkpoint(root / "plain", PACKAGED_MODEL_ID, ["negative", "positive"], method="lora", seed=20)
    return root
