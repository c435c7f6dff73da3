"""Shared base encoders: one per base model, in one or more lanes, with the adapters in its slots.

Adapters on the same base model share one :class:`~cogalora.CoGaLoRAModel` (the resident-adapter
cache, ``service.repository``, decides which adapters are in its slots). A *lane* is an identical
copy of that model that runs one forward at a time; several lanes run forwards at once.
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


class Lanes:
    """Identical copies of one model, each running one forward at a time (a *lane*).

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
    models = []
    try:
        # The encoder's own head width (a local base may ship a classifier); the head is replaced anyway.
        base_config = AutoConfig.from_pretrained(spec.key, trust_remote_code=False)
        for _ in range(lanes):
            model = CoGaLoRAModel(load_base_model(meta.base_model, num_labels=base_config.num_labels), config)
            model.requires_grad_(False)
            model.to(device).eval()
            models.append(model.set_precision(precision))
        tokenizer = load_tokenizer(meta.base_model)
    except Exception as exc:  # unreadable weights raise the reader's own errors (e.g. SafetensorError)
        raise CheckpointError(f"base model {meta.base_model!r} cannot be loaded ({exc})") from exc
    tokenizer_max = getattr(tokenizer, "model_max_length", spec.max_positions) or spec.max_positions
    logger.info("loaded base model %s (%d adapter sites, %d lanes)", spec.key, len(models[0].sites), lanes)
    return SharedEncoder(
        key=spec.key, lanes=Lanes(models), tokenizer=tokenizer, max_positions=min(spec.max_positions, tokenizer_max)
    )
