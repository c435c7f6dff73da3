"""Plain PEFT LoRA folders as adapters: what ``PeftModel.save_pretrained`` writes for a sequence
classifier, read as a ``lora`` checkpoint (every site always on).

::

    <name>/
      adapter_config.json        PEFT LoraConfig: peft_type LORA, task_type SEQ_CLS
      adapter_model.safetensors  lora_A / lora_B of every target module, and the head (modules_to_save)
      config.json                optional: the fine-tuned model's config; its id2label names the labels
      serving.json               optional: {"labels": [...], "base_model": "...", "max_length": N}
      README.md                  ignored

Everything PEFT's own ``PeftModel`` computes for such a folder is reproduced: a rank and alpha per
module (``rank_pattern`` / ``alpha_pattern``, matched as PEFT matches them), rsLoRA's
``alpha / sqrt(r)``, any subset of the encoder's Linear layers (BERT's pooler included) and the
head from ``modules_to_save``. A folder that would compute something else (DoRA, another PEFT type
or task, trained biases, a module the service does not adapt) is refused with a reason that says
what to change. Like a CoGaLoRA checkpoint, only JSON and safetensors are read, and shapes are
checked against the base model's layers from the safetensors header before any tensor is read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from cogalora.architectures import (
    ALL_MODULE_KINDS,
    ARCHITECTURES,
    Architecture,
    find_pooler_linears,
    find_sites,
    site_order,
)
from cogalora.base_model import resolve_base_model
from cogalora.checkpoint import (
    ADAPTER_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    PEFT_CONFIG_FILE,
    CheckpointError,
    CheckpointMeta,
    read_json,
    read_tensors,
)
from cogalora.weights import AdapterWeights

SIDECAR_FILE = "serving.json"
MODEL_CONFIG_FILE = "config.json"
_PEFT_PREFIX = "base_model.model."
#: PEFT wraps each ``modules_to_save`` module; some versions save the copy under this segment.
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save(\.[^.]+)?(?=\.)")
_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")

#: LoraConfig fields that change what the adapter computes in ways this service does not reproduce:
#: field -> what it is, for the message. A folder with any of them set is refused.
_UNSERVED_FEATURES = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters instead of modules",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QALoRA",
    "arrow_config": "Arrow routing",
    "megatron_config": "Megatron layers",
}
#: Initialisations that rewrite the base weights: the adapter is only right on that modified base.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class ServingSidecar(BaseModel):
    """``serving.json``: what a PEFT folder does not say about serving. Every field is optional."""

    model_config = ConfigDict(extra="forbid")

    labels: list[str] | None = Field(None, min_length=2, description="Label names, in the head's output order.")
    base_model: str | None = Field(
        None, min_length=1, description="Base model id or path; overrides base_model_name_or_path."
    )
    max_length: int | None = Field(None, ge=2, description="Longest input in tokens; default the base tokenizer's.")


@dataclass(frozen=True)
class _Base:
    """A base model's layer shapes, read from its config alone (a weightless ``meta`` skeleton)."""

    model_type: str
    architecture: Architecture
    sites: dict[str, tuple[str, str]]
    """module path -> (site name, module kind) of every Linear a gated site can adapt"""
    poolers: frozenset[str]
    shapes: dict[str, tuple[int, int]]
    """module path -> (in_features, out_features) of every Linear"""
    max_length: int


def is_peft_folder(directory: str | Path) -> bool:
    """A folder PEFT wrote (``adapter_config.json``) that is not a CoGaLoRA checkpoint (no ``cogalora.json``)."""
    directory = Path(directory)
    return (directory / PEFT_CONFIG_FILE).is_file() and not (directory / CONFIG_FILE).is_file()


def read_peft_folder(directory: str | Path, data: bool = True) -> tuple[CheckpointMeta, AdapterWeights]:
    """Read and cross-check a PEFT LoRA folder against its base model's layers (not its weights).

    ``data=False`` checks names and shapes from the safetensors header alone (shape-only ``meta``
    tensors come back), as :func:`cogalora.checkpoint.read_adapter` does.
    """
    directory = Path(directory)
    config_path = directory / PEFT_CONFIG_FILE
    config = read_json(config_path)
    _check_servable(config, config_path)
    sidecar = _read_sidecar(directory / SIDECAR_FILE)
    base_name = sidecar.base_model or config.get("base_model_name_or_path")
    if not isinstance(base_name, str) or not base_name:
        raise CheckpointError(
            f"{config_path}: field 'base_model_name_or_path': no base model named; "
            f'name it in {SIDECAR_FILE} as "base_model"'
        )
    base = _base(resolve_base_model(base_name), base_name)
    adapter_path = directory / ADAPTER_FILE
    if not adapter_path.is_file():
        raise CheckpointError(
            f"{adapter_path}: file not found; only safetensors weights are read (pickled .bin files never are): "
            "save the adapter with save_pretrained(..., safe_serialization=True), PEFT's default"
        )
    lora, head = _split_tensors(read_tensors(adapter_path, data), adapter_path, base)
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise CheckpointError(f"{config_path}: fields 'r' and 'lora_alpha' must be a positive integer and a number")
    weights = AdapterWeights(scaling=_scaling(alpha, rank, config))
    for path, (lora_A, lora_B) in sorted(lora.items()):
        site_rank = _pattern_value(config.get("rank_pattern"), path, rank)
        site_alpha = _pattern_value(config.get("alpha_pattern"), path, alpha)
        expected = ((site_rank, base.shapes[path][0]), (base.shapes[path][1], site_rank))
        if (tuple(lora_A.shape), tuple(lora_B.shape)) != expected:
            raise CheckpointError(
                f"{adapter_path}: module {path!r} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}; "
                f"its rank {site_rank} ({PEFT_CONFIG_FILE}) and the base model need {expected[0]} and {expected[1]}"
            )
        weights.lora[path] = (lora_A, lora_B)
        if (site_scaling := _scaling(site_alpha, site_rank, config)) != weights.scaling:
            weights.site_scaling[path] = site_scaling
    if not weights.lora:
        raise CheckpointError(f"{adapter_path}: no lora_A / lora_B tensors: an empty adapter")
    weights.head = _head(head, adapter_path, base)
    labels = _labels(directory, sidecar, len(next(reversed(weights.head.values()))[0]))
    kinds = {base.sites[path][1] for path in weights.lora if path in base.sites}
    meta = CheckpointMeta(
        format_version=FORMAT_VERSION,
        method="lora",
        base_model=base_name,
        labels=labels,
        max_length=sidecar.max_length or base.max_length,
        rank=rank,
        alpha=float(alpha),
        target_modules=[kind for kind in ALL_MODULE_KINDS if kind in kinds],
        sites=sorted((base.sites[path][0] for path in weights.lora if path in base.sites), key=site_order),
        tau=0.5,
        head_modules=list(base.architecture.head_linears),
        training={"source": "peft", "peft_version": config.get("peft_version")},
        **{"lambda": 0.0},
    )
    return meta, weights


# ---- adapter_config.json and serving.json -------------------------------------------------------


def _check_servable(config: dict[str, Any], path: Path) -> None:
    peft_type, task_type = config.get("peft_type"), config.get("task_type")
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: field 'peft_type': {peft_type!r} adapters are not served, only LORA")
    if task_type != "SEQ_CLS":
        raise CheckpointError(
            f"{path}: field 'task_type': {task_type!r}; only sequence classifiers (SEQ_CLS) are served: "
            "train with LoraConfig(task_type='SEQ_CLS') on AutoModelForSequenceClassification"
        )
    for field, feature in _UNSERVED_FEATURES.items():
        if config.get(field):
            raise CheckpointError(f"{path}: field {field!r}: {feature} is not served; retrain as plain LoRA")
    bias = config.get("bias", "none")
    if bias != "none":
        raise CheckpointError(
            f"{path}: field 'bias': {bias!r} trains the encoder's own biases, which one shared encoder cannot "
            "hold per adapter; retrain with bias='none'"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise CheckpointError(
            f"{path}: field 'init_lora_weights': {init!r} changed the base weights at initialisation, so this "
            "adapter is only right on that changed base; save it with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA"
        )
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(isinstance(v, int | float) for v in patterns.values()):
            raise CheckpointError(f"{path}: field {field!r}: expected an object of numbers")


def _read_sidecar(path: Path) -> ServingSidecar:
    if not path.exists():
        return ServingSidecar()
    try:
        return ServingSidecar.model_validate(read_json(path))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise CheckpointError(f"{path}: field {field!r}: {first['msg']}") from None


def _pattern_value(patterns: dict[str, float] | None, path: str, default: float) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the module path, or the default."""
    for pattern, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", path):
                return value
        except re.error:
            continue  # PEFT would have failed on it too; the key simply matches nothing here
    return default


def _scaling(alpha: float, rank: int, config: dict[str, Any]) -> float:
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# ---- the base model's layers ----------------------------------------------------------------------


@lru_cache(maxsize=32)
def _base_layers(resolved: str) -> _Base:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(resolved, trust_remote_code=False)
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"model type {config.model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config, trust_remote_code=False)
    positions = getattr(config, "max_position_embeddings", None) or 512
    if config.model_type in ("roberta", "xlm-roberta"):
        positions -= 2  # RoBERTa position ids start after the padding index
    tokenizer_max = AutoTokenizer.from_pretrained(resolved, trust_remote_code=False).model_max_length or positions
    return _Base(
        model_type=config.model_type,
        architecture=ARCHITECTURES[config.model_type],
        sites={site.module_path: (site.name, site.kind) for site in find_sites(skeleton, ALL_MODULE_KINDS)},
        poolers=frozenset(find_pooler_linears(skeleton)),
        shapes={
            path: (module.in_features, module.out_features)
            for path, module in skeleton.named_modules()
            if isinstance(module, torch.nn.Linear)
        },
        max_length=min(positions, tokenizer_max),
    )


def _base(resolved: str, name: str) -> _Base:
    try:
        return _base_layers(resolved)
    except (OSError, ValueError, ImportError) as exc:
        raise CheckpointError(
            f"base model {name!r} cannot be found or read here ({exc}); make it available locally (a path, or "
            f'a Hugging Face id in the local cache) or name another one in {SIDECAR_FILE} as "base_model"'
        ) from exc


# ---- adapter_model.safetensors ---------------------------------------------------------------------


def _split_tensors(
    tensors: dict[str, Tensor], path: Path, base: _Base
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, dict[str, Tensor]]]:
    """``(module -> (A, B), head module -> {"weight", "bias"})``; any other tensor is refused."""
    lora: dict[str, dict[str, Tensor]] = {}
    head: dict[str, dict[str, Tensor]] = {}
    adaptable = set(base.sites) | base.poolers
    for key, tensor in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            raise CheckpointError(f"{path}: tensor {key!r} does not start with {_PEFT_PREFIX!r}")
        name = _MODULES_TO_SAVE.sub("", key[len(_PEFT_PREFIX) :])
        module, _, part = name.rpartition(".")
        owner, _, kind = module.rpartition(".")
        if kind in ("lora_A", "lora_B") and part == "weight":
            if owner not in adaptable:
                raise CheckpointError(
                    f"{path}: tensor {key!r}: LoRA on {owner!r}, which is not a layer this service adapts on "
                    f"{base.model_type!r} (attention query/key/value/output, FFN up/down, pooler)"
                )
            lora.setdefault(owner, {})[kind] = tensor
        elif module in base.architecture.head_linears and part in ("weight", "bias"):
            head.setdefault(module, {})[part] = tensor
        elif "lora_" in name:
            raise CheckpointError(
                f"{path}: tensor {key!r}: this kind of LoRA weight is not served; only lora_A / lora_B on Linear "
                "layers (plain LoRA)"
            )
        else:
            raise CheckpointError(
                f"{path}: tensor {key!r} trains {module!r} itself, which one shared encoder cannot hold per "
                "adapter; only LoRA weights and the classification head (modules_to_save) are served"
            )
    pairs = {}
    for module, parts in lora.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{path}: module {module!r} lacks {sorted({'lora_A', 'lora_B'} - set(parts))}")
        pairs[module] = (parts["lora_A"], parts["lora_B"])
    return pairs, head


def _head(head: dict[str, dict[str, Tensor]], path: Path, base: _Base) -> dict[str, tuple[Tensor, Tensor]]:
    """The classification head's layers in forward order, shapes checked against the base's."""
    modules = base.architecture.head_linears
    if not head:
        raise CheckpointError(
            f"{path}: no classification head ({', '.join(modules)}): train with task_type='SEQ_CLS', which saves "
            "the head through modules_to_save"
        )
    layers = {}
    for position, module in enumerate(modules):
        parts = head.get(module, {})
        if set(parts) != {"weight", "bias"}:
            raise CheckpointError(f"{path}: head module {module!r} needs both weight and bias")
        weight, bias = parts["weight"], parts["bias"]
        in_features, out_features = base.shapes[module]
        last = position == len(modules) - 1
        rows = weight.shape[0] if last and weight.dim() == 2 else out_features
        if tuple(weight.shape) != (rows, in_features) or tuple(bias.shape) != (rows,):
            raise CheckpointError(
                f"{path}: head module {module!r} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}; "
                f"the base model needs ({'labels' if last else out_features}, {in_features})"
            )
        layers[module] = (weight, bias)
    return layers


# ---- labels ---------------------------------------------------------------------------------------


def _labels(directory: Path, sidecar: ServingSidecar, count: int) -> list[str]:
    """From ``config.json``'s ``id2label``, else ``serving.json``'s ``labels``, else ``LABEL_0..n-1``."""
    if count < 2:
        raise CheckpointError(f"{directory / ADAPTER_FILE}: the head has {count} output; a classifier needs 2 or more")
    named = _config_labels(directory / MODEL_CONFIG_FILE, count)
    if sidecar.labels is not None:
        if len(sidecar.labels) != count:
            raise CheckpointError(
                f"{directory / SIDECAR_FILE}: field 'labels' lists {len(sidecar.labels)} names, "
                f"the head has {count} outputs"
            )
        if named is not None and named != sidecar.labels:
            raise CheckpointError(
                f"{directory / SIDECAR_FILE}: field 'labels' disagrees with id2label in {MODEL_CONFIG_FILE}; keep one"
            )
        return list(sidecar.labels)
    return named or [f"LABEL_{index}" for index in range(count)]


def _config_labels(path: Path, count: int) -> list[str] | None:
    """The label names of ``config.json``'s ``id2label``; None without the file or with default names."""
    if not path.exists():
        return None
    id2label = read_json(path).get("id2label")
    if id2label is None:
        return None
    try:
        names = {int(index): str(name) for index, name in dict(id2label).items()}
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: field 'id2label': expected an object of index -> label name") from None
    if sorted(names) != list(range(count)):
        raise CheckpointError(f"{path}: field 'id2label' has {len(names)} labels, the head has {count} outputs")
    labels = [names[index] for index in range(count)]
    return None if all(_DEFAULT_LABEL.match(label) for label in labels) else labels
