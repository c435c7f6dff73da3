"""Checkpoint files (docs/architecture.md): PEFT-compatible adapter + CoGaLoRA routers and metadata.

::

    <name>/
      adapter_config.json        PEFT LoraConfig (all gates on)
      adapter_model.safetensors  PEFT LoRA weights + head ("modules_to_save")
      cogalora.json              metadata, see CheckpointMeta
      routers.safetensors        router weights of the routed methods, ``<module>.router.<part>``:
                                 w1, b1, w2, b2, and the heads of the method's variant
                                 (``cogalora.variants``): radlora's rank head ``rank_w``
                                 [choices, hidden] and ``rank_b``, hyperlora's scale generator
                                 ``scale_w`` [rank, d_in] and ``scale_b`` [rank]
      model.safetensors          full weights (method "full" only; no adapter files)

Only JSON and safetensors are read. Every failure raises :class:`CheckpointError`
naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from cogalora.architectures import ALL_MODULE_KINDS
from cogalora.bank import RouterInputNorm
from cogalora.config import DEFAULT_RANK_SET, ROUTED_METHODS, CoGaLoRAConfig, Method, check_rank_set, method_variant
from cogalora.variants import AdapterVariant
from cogalora.weights import AdapterWeights, RouterWeights

FORMAT_VERSION = 1
CONFIG_FILE = "cogalora.json"
PEFT_CONFIG_FILE = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
ROUTER_FILE = "routers.safetensors"
FULL_MODEL_FILE = "model.safetensors"
_PEFT_PREFIX = "base_model.model."
_ROUTER_PARTS = ("w1", "b1", "w2", "b2")


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not fit; the message names file and field."""


class RouterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(ge=1)
    activation: Literal["relu"] = "relu"
    pooling: Literal["masked_mean"] = "masked_mean"
    input_norm: RouterInputNorm = "none"
    """Normalisation of the pooled input before the router's first layer (absent in older checkpoints)."""


class CheckpointMeta(BaseModel):
    """Contents of ``cogalora.json``."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")

    format_version: int = Field(ge=1, le=FORMAT_VERSION)
    method: Method
    base_model: str = Field(min_length=1)
    labels: list[str] = Field(min_length=2)
    max_length: int = Field(ge=2)
    rank: int = Field(ge=1)
    alpha: float
    target_modules: list[str]
    """Module kinds the adapter was trained on (``attention.query`` ...)."""
    sites: list[str] = []
    """Site names that still carry an adapter (after pruning / the freezing trick)."""
    tau: float = Field(ge=0.0, le=1.0)
    sparsity_lambda: float = Field(alias="lambda", ge=0.0)
    rank_set: list[int] | None = None
    """``radlora``: the ranks its routers choose from (0: off); the stored adapter has rank ``rank``."""
    rank_lambda: float = Field(0.0, ge=0.0)
    """``radlora``: weight of the expected-rank penalty it was trained with."""
    router: RouterSpec | None = None
    head_modules: list[str] = []
    metrics: dict[str, Any] = {}
    training: dict[str, Any] = {}

    def activation_reference(self) -> dict[str, float] | None:
        """Per-site activation rates measured on dev data *at the served tau*, or None if unknown.

        ``python -m training calibrate`` records them beside the tau it picks; training's own evaluation
        records them at the training tau, which is only the served tau when no calibration moved it.
        Rates at another tau would make every row look like drift, so they are not offered.
        """
        calibration = (self.model_extra or {}).get("calibration")
        chosen = calibration.get("chosen") if isinstance(calibration, dict) else None
        if isinstance(chosen, dict) and chosen.get("tau") == self.tau:
            rates = chosen.get("per_module_activation_rate")
            return _rates(rates) if rates else None
        trained_tau = self.training.get("tau", self.tau)
        rates = self.metrics.get("per_module_activation_rate")
        if rates and trained_tau == self.tau:
            return _rates(rates)
        return None

    @property
    def routed_ranks(self) -> list[int] | None:
        """The rank choices of a rank-routing (``radlora``) adapter; ``None`` for every other method."""
        return self.variant.checkpoint_fields().get("rank_set")

    @property
    def variant(self) -> AdapterVariant:
        """What the method's routers add to plain gated LoRA (``cogalora.variants``)."""
        return method_variant(self.method, self.rank_set or DEFAULT_RANK_SET)

    def to_config(self) -> CoGaLoRAConfig:
        optional: dict[str, Any] = {}  # absent here: the config's own defaults
        if self.router is not None:
            optional |= {"router_hidden": self.router.hidden, "router_input_norm": self.router.input_norm}
        if self.rank_set:
            optional["rank_set"] = tuple(self.rank_set)
        return CoGaLoRAConfig(
            method=self.method,
            rank=self.rank,
            alpha=self.alpha,
            target_modules=tuple(kind for kind in self.target_modules if kind in ALL_MODULE_KINDS),
            tau=self.tau,
            sparsity_lambda=self.sparsity_lambda,
            rank_lambda=self.rank_lambda,
            head_modules=tuple(self.head_modules) or None,
            **optional,
        )


def _rates(value: Any) -> dict[str, float] | None:
    """A ``{site: rate}`` mapping with numeric rates, or None when the JSON holds something else."""
    if not isinstance(value, dict) or not all(isinstance(rate, int | float) for rate in value.values()):
        return None
    return {str(site): float(rate) for site, rate in value.items()}


# ---- writing ----------------------------------------------------------------------------------


def save_checkpoint(model, directory: str | Path, meta: CheckpointMeta, slot: int = 0) -> Path:
    """Write the adapter in ``slot`` of a :class:`~cogalora.model.CoGaLoRAModel` to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if meta.method == "full":
        state = {key: value.detach().contiguous() for key, value in model.model.state_dict().items()}
        for path, head in model.head_layers.items():
            weight, bias = head.get_slot(slot)
            for key in [k for k in state if k.startswith(f"{path}.")]:
                del state[key]
            state[f"{path}.weight"], state[f"{path}.bias"] = weight.contiguous(), bias.contiguous()
        _write_tensors(directory / FULL_MODEL_FILE, state)
    else:
        if any(layer.galora_gate is not None for layer in model.gated_layers.values()):
            raise ValueError("GaLoRA gates are not folded yet: call model.finalize_galora() before saving")
        weights = model.adapter_weights(slot)
        norms = {router.input_norm for router in weights.routers.values()}
        if len(norms) > 1:
            raise ValueError(f"routers of one adapter mix input normalisations {sorted(norms)}")
        if norms and meta.router is not None:  # what the routers really do, whatever the caller wrote
            meta = meta.model_copy(update={"router": meta.router.model_copy(update={"input_norm": norms.pop()})})
        adapter_tensors: dict[str, Tensor] = {}
        for path, (lora_A, lora_B) in weights.lora.items():
            adapter_tensors[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = lora_A.contiguous()
            adapter_tensors[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = lora_B.contiguous()
        for path, (weight, bias) in weights.head.items():
            adapter_tensors[f"{_PEFT_PREFIX}{path}.weight"] = weight.contiguous()
            adapter_tensors[f"{_PEFT_PREFIX}{path}.bias"] = bias.contiguous()
        _write_tensors(directory / ADAPTER_FILE, adapter_tensors)
        _write_json(directory / PEFT_CONFIG_FILE, _peft_config(model, meta, sorted(weights.lora)))
        router_file = directory / ROUTER_FILE
        if weights.routers:
            router_tensors = {
                f"{path}.router.{part}": tensor.contiguous()
                for path, router in weights.routers.items()
                for part, tensor in router.parts().items()
            }
            _write_tensors(router_file, router_tensors)
        elif router_file.exists():
            router_file.unlink()
        present = model.site_present(slot)
        meta = meta.model_copy(update={"sites": [s.name for s, on in zip(model.sites, present, strict=True) if on]})
        # What the routers' variant really is (e.g. RAD-LoRA's rank choices), whatever the caller wrote.
        meta = meta.model_copy(update=weights.variant.checkpoint_fields())
    meta = meta.model_copy(update={"head_modules": list(model.head_layers)})
    _write_json(directory / CONFIG_FILE, meta.model_dump(by_alias=True, mode="json"))
    return directory


def _peft_config(model, meta: CheckpointMeta, module_paths: list[str]) -> dict[str, Any]:
    # Exact module paths: PEFT matches a target by equality or dotted suffix, so a pruned module
    # simply is not listed, and PEFT injects exactly the modules this checkpoint has.
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": meta.base_model,
        "r": meta.rank,
        "lora_alpha": meta.alpha,
        "lora_dropout": 0.0,
        "target_modules": module_paths,
        "modules_to_save": list(model.architecture.peft_modules_to_save),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    # Written like any other file (mode 0666 less the umask, so 0644 as a rule), not with safetensors'
    # save_file, which creates 0600 files: a checkpoint mounted into the service image is read by
    # another user than the one who trained it.
    path.write_bytes(save(tensors, metadata={"format": "pt"}))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def update_meta(directory: str | Path, **changes: Any) -> CheckpointMeta:
    """Rewrite fields of ``cogalora.json`` (for example a calibrated ``tau``), validated."""
    path = Path(directory) / CONFIG_FILE
    data = read_json(path)
    data.update(changes)
    meta = _validate_meta(data, path)
    _write_json(path, meta.model_dump(by_alias=True, mode="json"))
    return meta


# ---- reading ----------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _validate_meta(data: dict[str, Any], path: Path) -> CheckpointMeta:
    try:
        meta = CheckpointMeta.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise CheckpointError(f"{path}: field {field!r}: {first['msg']}") from None
    if meta.method == "radlora":
        if meta.rank_set is None:
            raise CheckpointError(f"{path}: field 'rank_set': required for method 'radlora'")
        try:
            meta.rank_set = list(check_rank_set(tuple(meta.rank_set), meta.rank))
        except ValueError as exc:
            raise CheckpointError(f"{path}: field 'rank_set': {exc}") from None
    return meta


def read_tensors(path: Path, data: bool = True) -> dict[str, Tensor]:
    """The tensors of a safetensors file; ``data=False``: shape-only ``meta`` tensors from its header.

    Read with their data, floating-point tensors must be finite: weights holding a NaN or an infinity (a
    training run that diverged, a damaged export) would answer every input they touch with NaN scores
    and arbitrary labels, so they are refused here, naming the tensor.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        if not data:
            with safe_open(str(path), framework="pt") as handle:
                return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}  # noqa: SIM118
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            if bad:
                raise CheckpointError(
                    f"{path}: tensor {key!r} holds {bad} of {tensor.numel()} values that are not finite (NaN or "
                    "infinity)"
                )
    return tensors


def read_full_weights(directory: str | Path) -> dict[str, Tensor]:
    """The encoder and head weights of a ``full`` fine-tune (``model.safetensors``)."""
    return read_tensors(Path(directory) / FULL_MODEL_FILE)


def looks_like_checkpoint(directory: str | Path) -> bool:
    """Whether a folder holds an adapter's files (a checkpoint, a PEFT folder, or one missing its config)."""
    return any((Path(directory) / name).is_file() for name in (CONFIG_FILE, PEFT_CONFIG_FILE, ADAPTER_FILE))


def read_meta(directory: str | Path) -> CheckpointMeta:
    """The metadata of a checkpoint, or of a plain PEFT LoRA folder (``cogalora.peft_folder``)."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        if (directory / PEFT_CONFIG_FILE).is_file():
            return _peft_folder().read_peft_folder(directory, data=False)[0]
        raise CheckpointError(
            f"{directory}: neither {CONFIG_FILE} nor {PEFT_CONFIG_FILE}: not an adapter folder "
            f"(a PEFT adapter needs the {PEFT_CONFIG_FILE} that save_pretrained writes beside its weights)"
        )
    return _validate_meta(read_json(path), path)


def _peft_folder():
    # Imported on use: the PEFT folder reader builds on this module's readers.
    from cogalora import peft_folder

    return peft_folder


def read_adapter(directory: str | Path, data: bool = True) -> tuple[CheckpointMeta, AdapterWeights]:
    """Read and cross-check an adapter checkpoint (not ``full``), or a plain PEFT LoRA folder.

    A checkpoint needs no base model to be checked; a PEFT folder is checked against its base
    model's layer shapes (its config only, see ``cogalora.peft_folder``).

    ``data=False`` validates the same names and shapes from the safetensors headers alone (the
    weights come back as shape-only ``meta`` tensors): cheap enough to check a whole repository.
    """
    directory = Path(directory)
    if _peft_folder().is_peft_folder(directory):
        return _peft_folder().read_peft_folder(directory, data)
    meta = read_meta(directory)
    if meta.method == "full":
        raise CheckpointError(f"{directory / CONFIG_FILE}: field 'method': a full fine-tune has no adapter to load")
    adapter_path = directory / ADAPTER_FILE
    peft_config = read_json(directory / PEFT_CONFIG_FILE)
    if peft_config.get("r") != meta.rank:
        raise CheckpointError(
            f"{directory / PEFT_CONFIG_FILE}: field 'r': {peft_config.get('r')!r} disagrees with "
            f"rank {meta.rank} in {CONFIG_FILE}"
        )
    tensors = read_tensors(adapter_path, data)
    weights = AdapterWeights(scaling=meta.alpha / meta.rank)
    pending: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            raise CheckpointError(f"{adapter_path}: tensor {key!r} does not start with {_PEFT_PREFIX!r}")
        path = key[len(_PEFT_PREFIX) :]
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if path.endswith(suffix):
                pending.setdefault(path[: -len(suffix)], {})[part] = tensor
                break
        else:
            module, _, kind = path.rpartition(".")
            if kind not in ("weight", "bias") or not module:
                raise CheckpointError(f"{adapter_path}: unexpected tensor {key!r}")
            weights.head.setdefault(module, [None, None])[0 if kind == "weight" else 1] = tensor
    for module, parts in pending.items():
        if set(parts) != {"lora_A", "lora_B"}:
            missing = {"lora_A", "lora_B"} - set(parts)
            raise CheckpointError(f"{adapter_path}: module {module!r} lacks {sorted(missing)}")
        lora_A, lora_B = parts["lora_A"], parts["lora_B"]
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != meta.rank or lora_B.shape[1] != meta.rank:
            raise CheckpointError(
                f"{adapter_path}: tensor {_PEFT_PREFIX}{module}.lora_A/B has shapes {tuple(lora_A.shape)} / "
                f"{tuple(lora_B.shape)}, expected rank {meta.rank} from {CONFIG_FILE}"
            )
        weights.lora[module] = (lora_A, lora_B)
    for module, pair in list(weights.head.items()):
        if pair[0] is None or pair[1] is None:
            raise CheckpointError(f"{adapter_path}: head module {module!r} needs both weight and bias")
        weights.head[module] = (pair[0], pair[1])
    output = list(weights.head.values())[-1][0] if weights.head else None
    if output is None or output.shape[0] != len(meta.labels):
        raise CheckpointError(
            f"{adapter_path}: head output has {None if output is None else output.shape[0]} rows, "
            f"but {CONFIG_FILE} field 'labels' lists {len(meta.labels)}"
        )
    if meta.method in ROUTED_METHODS:
        weights.variant = meta.variant  # its rank set was checked by read_meta
        weights.routers = _read_routers(directory / ROUTER_FILE, meta, set(weights.lora), data)
    return meta, weights


def _read_routers(path: Path, meta: CheckpointMeta, modules: set[str], data: bool) -> dict[str, RouterWeights]:
    if meta.router is None:
        raise CheckpointError(f"{path.parent / CONFIG_FILE}: field 'router': required for method {meta.method!r}")
    variant = meta.variant
    hidden = meta.router.hidden
    expected_parts = _ROUTER_PARTS + tuple(variant.heads(0, meta.rank, hidden))
    tensors = read_tensors(path, data)
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        module, marker, part = key.rpartition(".router.")
        if not marker or part not in expected_parts:
            raise CheckpointError(f"{path}: unexpected tensor {key!r}")
        grouped.setdefault(module, {})[part] = tensor
    if set(grouped) != modules:
        odd = sorted(set(grouped) ^ modules)
        raise CheckpointError(f"{path}: routers and adapter modules differ, e.g. {odd[:3]}")
    routers = {}
    for module, parts in grouped.items():
        if set(parts) != set(expected_parts):
            raise CheckpointError(f"{path}: router of {module!r} lacks {sorted(set(expected_parts) - set(parts))}")
        d_in = parts["w1"].shape[-1]
        expected = {"w1": (hidden, d_in), "b1": (hidden,), "w2": (hidden,), "b2": (1,)}
        expected |= variant.heads(d_in, meta.rank, hidden)
        for part, shape in expected.items():
            if tuple(parts[part].shape) != shape:
                raise CheckpointError(
                    f"{path}: tensor {module}.router.{part} has shape {tuple(parts[part].shape)}, expected {shape}"
                )
        core = {part: parts.pop(part) for part in _ROUTER_PARTS}
        routers[module] = RouterWeights(**core, input_norm=meta.router.input_norm, heads=parts)
    return routers
