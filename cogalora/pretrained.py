"""Building a CoGaLoRA model: fresh for training, or from a checkpoint directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cogalora.base_model import load_base_model, load_tokenizer, resolve_base_model
from cogalora.checkpoint import (
    FULL_MODEL_FILE,
    CheckpointError,
    CheckpointMeta,
    read_adapter,
    read_full_weights,
    read_meta,
)
from cogalora.config import ALL_MODULE_KINDS, CoGaLoRAConfig
from cogalora.model import CoGaLoRAModel


@dataclass
class LoadedModel:
    model: CoGaLoRAModel
    tokenizer: object
    meta: CheckpointMeta


def new_model(
    base_model: str, config: CoGaLoRAConfig, labels: list[str], attn_implementation: str | None = None
) -> CoGaLoRAModel:
    """A base encoder with a fresh adapter and head in slot 0, ready to train."""
    # The base keeps its own head width; prepare_for_training swaps in one with len(labels) outputs.
    base = load_base_model(base_model, attn_implementation=attn_implementation)
    model = CoGaLoRAModel(base, config)
    model.prepare_for_training(labels)
    return model


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", attn_implementation: str | None = None
) -> LoadedModel:
    """Load a checkpoint of any method onto its base model, in eval mode."""
    directory = Path(directory)
    meta = read_meta(directory)
    config = meta.to_config()
    source = str(directory)
    # Read and cross-check the adapter files first: a damaged checkpoint fails before the base loads.
    weights = None if meta.method == "full" else read_adapter(directory)[1]
    model = CoGaLoRAModel(load_base_model(meta.base_model, attn_implementation=attn_implementation), config)
    if meta.method == "full":
        state = read_full_weights(directory)
        head_state = {}
        for path in model.head_layers:
            head_state[path] = (state.pop(f"{path}.weight", None), state.pop(f"{path}.bias", None))
        missing, unexpected = model.model.load_state_dict(state, strict=False)
        missing = [key for key in missing if not any(key.startswith(f"{p}.") for p in model.head_layers)]
        if missing or unexpected:
            raise CheckpointError(
                f"{directory / FULL_MODEL_FILE}: weights do not fit base {meta.base_model!r} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for path, (weight, bias) in head_state.items():
            if weight is None or bias is None:
                raise CheckpointError(f"{directory / FULL_MODEL_FILE}: head tensors of {path!r} missing")
            model.head_layers[path].set_slot(0, weight, bias, source=source)
        model.slot_labels[0] = list(meta.labels)
    else:
        try:
            model.set_adapter(0, weights, meta.labels, source=source)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    model.requires_grad_(False)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=load_tokenizer(meta.base_model), meta=meta)


def verify_adapter(directory: str | Path) -> CheckpointMeta:
    """Everything a serving load does short of the base model's weights; raises :class:`CheckpointError`.

    Every tensor is read, then the adapter is put into a slot of a weightless (``meta`` device) copy of
    its base model, built as the service builds its shared encoders (every site kind): what passes
    here loads into the service.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    directory = Path(directory)
    meta, weights = read_adapter(directory)
    config = CoGaLoRAConfig(
        method="cogalora", target_modules=ALL_MODULE_KINDS, head_modules=tuple(meta.head_modules) or None
    )
    try:
        base_config = AutoConfig.from_pretrained(resolve_base_model(meta.base_model), trust_remote_code=False)
        with torch.device("meta"):
            base = AutoModelForSequenceClassification.from_config(base_config, trust_remote_code=False)
        CoGaLoRAModel(base, config).set_adapter(0, weights, meta.labels, source=directory.name)
    except (OSError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    return meta
