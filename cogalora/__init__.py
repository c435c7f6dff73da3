"""CoGaLoRA: conditional gated LoRA, where a tiny router per adapter decides, per input, whether it runs.

The library shared by ``training/`` and ``service/``: configuration, routers and gated
layers, injection into Hugging Face encoders, checkpoint I/O and FLOP accounting.
"""

from cogalora.architectures import Site
from cogalora.base_model import PACKAGED_MODEL_ID, load_base_model, load_tokenizer, resolve_base_model
from cogalora.checkpoint import CheckpointError, CheckpointMeta, read_adapter, read_meta, save_checkpoint, update_meta
from cogalora.config import ALL_MODULE_KINDS, METHODS, CoGaLoRAConfig
from cogalora.flops import FlopBreakdown, FlopModel
from cogalora.model import CoGaLoRAModel, RoutedOutput
from cogalora.pretrained import LoadedModel, load_model, new_model
from cogalora.weights import AdapterWeights, RouterWeights

__all__ = [
    "ALL_MODULE_KINDS",
    "METHODS",
    "PACKAGED_MODEL_ID",
    "AdapterWeights",
    "CheckpointError",
    "CheckpointMeta",
    "CoGaLoRAConfig",
    "CoGaLoRAModel",
    "FlopBreakdown",
    "FlopModel",
    "LoadedModel",
    "RoutedOutput",
    "RouterWeights",
    "Site",
    "load_base_model",
    "load_model",
    "load_tokenizer",
    "new_model",
    "read_adapter",
    "read_meta",
    "resolve_base_model",
    "save_checkpoint",
    "update_meta",
]
