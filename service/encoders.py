"""Shared base encoders: one per base model, in one or more lanes, with the adapters in its slots.

Adapters on the same base model share one :class:`~cogalora.CoGaLoRAModel` (the resident-adapter
cache, ``service.repository``, decides which adapters are in its slots). A *lane* is a copy of that
model that runs one forward at a time; several lanes run forwards at once. Lanes hold their own
adapter slots (banks, heads, slot table, routing state) but one copy of the frozen base encoder
(:func:`share_frozen_base`): a second lane costs its adapters, not a second MiniLM.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from cogalora import (
    ALL_MODULE_KINDS,
    CheckpointError,
    CheckpointMeta,
    CoGaLoRAConfig,
    CoGaLoRAModel,
    load_base_model,
    load_tokenizer,
)
from cogalora.precision import Precision
from service.catalogue import BaseSpec

logger = logging.getLogger(__name__)


def _per_lane_modules(model: CoGaLoRAModel) -> set[int]:
    """Ids of the modules of ``model``'s base encoder whose tensors hold adapters: every adapter layer
    (gated sites, pooler LoRA, heads) and what it owns, except the frozen layer it wraps (``base``)."""
    per_lane: set[int] = set()
    for layer in [*model.layers, *model.pooler_layers.values(), *model.head_layers.values()]:
        frozen = getattr(layer, "base", None)
        frozen_ids = {id(module) for module in frozen.modules()} if isinstance(frozen, nn.Module) else set()
        per_lane |= {id(module) for module in layer.modules() if id(module) not in frozen_ids}
    return per_lane


def share_frozen_base(lane: CoGaLoRAModel, like: CoGaLoRAModel) -> int:
    """Make ``lane`` compute with ``like``'s frozen base tensors (the same objects); return the bytes freed.

    Both models must be built alike (same base, config and precision: call this after
    ``set_precision``). Only the base encoder's own weights and buffers are shared (embeddings,
    LayerNorms, the Linear layers under the adapter sites, int8 codes): no adapter write ever reaches
    them. Adapter banks, heads and the slot table stay per lane, so each lane installs and removes
    adapters as before. Raises ``ValueError`` when the two models differ in structure.
    """
    per_lane = _per_lane_modules(like)
    freed = 0
    shared = list(like.model.named_modules(remove_duplicate=False))
    mine = list(lane.model.named_modules(remove_duplicate=False))
    if [name for name, _ in shared] != [name for name, _ in mine]:
        raise ValueError("the lanes' base encoders differ in structure")
    for (name, source), (_, target) in zip(shared, mine, strict=True):
        if id(source) in per_lane:
            continue
        if type(source) is not type(target):
            raise ValueError(
                f"the lanes differ at {name or 'the encoder'}: {type(source).__name__} vs {type(target).__name__}"
            )
        for table in ("_parameters", "_buffers"):
            theirs, ours = getattr(source, table), getattr(target, table)
            if theirs.keys() != ours.keys():
                raise ValueError(f"the lanes differ at {name or 'the encoder'}: {sorted(theirs)} vs {sorted(ours)}")
            for key, tensor in theirs.items():
                own = ours[key]
                if tensor is None or own is None or own is tensor:
                    continue
                if own.shape != tensor.shape or own.dtype != tensor.dtype or own.device != tensor.device:
                    raise ValueError(
                        f"the lanes differ at {name}.{key}: {tuple(own.shape)} {own.dtype} vs "
                        f"{tuple(tensor.shape)} {tensor.dtype}"
                    )
                if own.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
                    freed += own.untyped_storage().nbytes()
                ours[key] = tensor
    return freed


class Lanes:
    """Copies of one model, each running one forward at a time (a *lane*), alike but for storage:
    they share the frozen base encoder (:func:`share_frozen_base`) and each holds its own adapters.

    Forwards on different lanes run at once (each on its own thread: torch releases the GIL inside
    its kernels), and a lane is one intra-op thread or a few: no thread ever waits at a barrier for
    another forward's thread. A slot change (:meth:`every`) waits until no forward runs, holds new
    ones back meanwhile, and changes every copy, so all lanes always hold the same adapters.
    """

    def __init__(self, models: list[CoGaLoRAModel]) -> None:
        self.models = models
        self._free = list(range(len(models)))
        self._changing = 0
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self.models)

    @contextmanager
    def one(self) -> Iterator[CoGaLoRAModel]:
        """A free copy for one forward."""
        with self._cond:
            while not self._free or self._changing:
                self._cond.wait()
            lane = self._free.pop()
        try:
            yield self.models[lane]
        finally:
            with self._cond:
                self._free.append(lane)
                self._cond.notify_all()

    @contextmanager
    def every(self) -> Iterator[list[CoGaLoRAModel]]:
        """Every copy, with no forward running (a slot change)."""
        with self._cond:
            self._changing += 1
            while len(self._free) < len(self.models):
                self._cond.wait()
            self._free.clear()
        try:
            yield self.models
        finally:
            with self._cond:
                self._changing -= 1
                self._free = list(range(len(self.models)))
                self._cond.notify_all()


@dataclass
class SharedEncoder:
    """One base encoder (in one or more lanes) and the adapters loaded into its slots."""

    key: str
    """Resolved base-model id or path (adapters with the same key share this encoder)."""
    lanes: Lanes
    tokenizer: Any
    max_positions: int
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    """Fast tokenizers are not safe to call from two threads at once."""
    slots: dict[int, str] = field(default_factory=dict)
    """slot -> adapter name"""

    @property
    def model(self) -> CoGaLoRAModel:
        """The first lane's copy: what describes the adapters (sites, ranks, FLOPs), all copies alike."""
        return self.lanes.models[0]

    @cached_property
    def site_names(self) -> list[str]:
        return self.model.site_names

    @cached_property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def free_slot(self) -> int:
        return next(slot for slot in itertools.count() if slot not in self.slots)

    def install(self, name: str, weights: Any, labels: list[str]) -> tuple[int, list[bool]]:
        """Put adapter ``name``'s weights into a free slot of every lane; the slot, and which sites it routes."""
        with self.lanes.every() as models:
            slot = self.free_slot()
            for model in models:
                model.set_adapter(slot, weights, labels, source=name)
            self.slots[slot] = name
            return slot, self.model.site_routed(slot)

    def remove(self, slot: int, name: str) -> None:
        """Empty ``slot`` in every lane, unless another adapter than ``name`` holds it by now."""
        with self.lanes.every() as models:
            if self.slots.get(slot) == name:
                del self.slots[slot]
                for model in models:
                    model.reset_adapter(slot)


def load_encoder(
    meta: CheckpointMeta, spec: BaseSpec, device: torch.device, precision: Precision, lanes: int
) -> SharedEncoder:
    """The base encoder of ``meta``'s adapter, in ``lanes`` copies, every adapter site kind injected so that
    adapters with other target modules fit too; raises ``CheckpointError`` when it cannot be loaded."""
    config = CoGaLoRAConfig(
        method="cogalora", target_modules=ALL_MODULE_KINDS, head_modules=tuple(meta.head_modules) or None
    )
    models: list[CoGaLoRAModel] = []
    shared = 0
    try:
        # The encoder's own head width (a local base may ship a classifier); the head is replaced anyway.
        base_config = AutoConfig.from_pretrained(spec.key, trust_remote_code=False)
        for _ in range(lanes):
            model = CoGaLoRAModel(load_base_model(meta.base_model, num_labels=base_config.num_labels), config)
            model.requires_grad_(False)
            model.to(device).eval()
            model.set_precision(precision)
            if models:
                shared += share_frozen_base(model, like=models[0])
            models.append(model)
        tokenizer = load_tokenizer(meta.base_model)
    except Exception as exc:  # unreadable weights raise the reader's own errors (e.g. SafetensorError)
        raise CheckpointError(f"base model {meta.base_model!r} cannot be loaded ({exc})") from exc
    tokenizer_max = getattr(tokenizer, "model_max_length", spec.max_positions) or spec.max_positions
    logger.info(
        "loaded base model %s (%d adapter sites, %d lanes sharing its frozen weights: %.0f MB saved)",
        spec.key,
        len(models[0].sites),
        lanes,
        shared / 1e6,
    )
    return SharedEncoder(
        key=spec.key, lanes=Lanes(models), tokenizer=tokenizer, max_positions=min(spec.max_positions, tokenizer_max)
    )
