"""The model repository: every checkpoint folder under one directory, one shared encoder per base model.

Adapters on the same base model live in the slots of one :class:`~cogalora.CoGaLoRAModel`; each
holds only its LoRA matrices, routers, head and labels. Loading and unloading at run time take the
base's lock, which the engine also holds for the length of a forward, so a forward never sees a slot
change half-way. Every load gets a fresh ``generation`` number: a row prepared for an adapter that
was unloaded (or reloaded) meanwhile is detected and answered with ``AdapterUnloadedError``.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from cogalora import (
    ALL_MODULE_KINDS,
    CheckpointError,
    CheckpointMeta,
    CoGaLoRAConfig,
    CoGaLoRAModel,
    FlopModel,
    load_base_model,
    load_tokenizer,
    read_adapter,
    read_meta,
    resolve_base_model,
)
from service.errors import AdapterConflictError, InvalidRequestError, ServiceError, UnknownAdapterError
from service.types import AdapterInfo

logger = logging.getLogger(__name__)

#: Adapter (folder) names the repository accepts: no separators, no leading dot, at most 64 characters.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONFIG_FILE = "cogalora.json"


class AdapterLoadError(ServiceError):
    """A checkpoint folder exists but cannot be served (damaged, ``method: full``, wrong base)."""

    status_code = 422
    error_type = "adapter_load_failed"


@dataclass
class BaseModel:
    """One shared encoder and the adapters loaded into its slots."""

    key: str
    """Resolved base-model id or path (adapters with the same key share this encoder)."""
    model: CoGaLoRAModel
    tokenizer: Any
    max_positions: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held for every forward and every slot change."""
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    """Fast tokenizers are not safe to call from two threads at once."""
    slots: dict[int, str] = field(default_factory=dict)
    """slot -> adapter name"""

    @property
    def site_names(self) -> list[str]:
        return self.model.site_names

    def free_slot(self) -> int:
        return next(slot for slot in itertools.count() if slot not in self.slots)


@dataclass
class LoadedAdapter:
    """One adapter as served: where it lives and what a request needs to know about it."""

    name: str
    meta: CheckpointMeta
    base: BaseModel
    slot: int
    generation: int
    max_length: int
    """The checkpoint's max_length, capped by the encoder's position embeddings."""
    site_present: list[bool]
    flops: FlopModel
    info: AdapterInfo

    @property
    def labels(self) -> list[str]:
        return self.meta.labels


class ModelRepository:
    """Loads checkpoint folders from ``model_dir`` onto shared base encoders."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.model_dir = Path(model_dir).expanduser()
        self.device = torch.device(device)
        self.dtype = dtype
        self._adapters: dict[str, LoadedAdapter] = {}
        self._bases: dict[str, BaseModel] = {}
        self._failures: dict[str, str] = {}
        self._lock = threading.RLock()
        self._generations = itertools.count(1)

    # ---- queries ------------------------------------------------------------------------------

    @property
    def failures(self) -> dict[str, str]:
        """Folder name -> why it could not be loaded (by the last ``load_all`` or ``load``)."""
        with self._lock:
            return dict(self._failures)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._adapters[name].info for name in sorted(self._adapters)]

    def info(self, name: str) -> AdapterInfo:
        return self.get(name).info

    def get(self, name: str) -> LoadedAdapter:
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None:
                loaded = ", ".join(sorted(self._adapters)) or "none"
                raise UnknownAdapterError(f"adapter {name!r} is not loaded (loaded: {loaded})")
            return adapter

    def is_current(self, name: str, generation: int) -> bool:
        """Whether ``name`` is still loaded as the same load (not unloaded, not replaced)."""
        adapter = self._adapters.get(name)
        return adapter is not None and adapter.generation == generation

    def bases(self) -> list[BaseModel]:
        with self._lock:
            return list(self._bases.values())

    # ---- loading ------------------------------------------------------------------------------

    def scan(self) -> list[str]:
        """Names of the checkpoint folders (folders with ``cogalora.json``) under ``model_dir``."""
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model directory {self.model_dir} does not exist or is not a directory")
        return sorted(p.name for p in self.model_dir.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())

    def load_all(self) -> dict[str, str]:
        """Load every checkpoint folder; broken ones are logged and skipped. Returns name -> error."""
        failures: dict[str, str] = {}
        for name in self.scan():
            if name in self._adapters:
                continue
            try:
                self.load(name)
            except ServiceError as exc:
                failures[name] = exc.message
                logger.warning("skipping checkpoint %r: %s", name, exc.message)
        with self._lock:
            self._failures = failures
        return failures

    def load(self, name: str, replace: bool = False) -> AdapterInfo:
        """Load the checkpoint folder ``model_dir/name`` into a slot of its base model.

        ``replace``: an adapter of that name already loaded is swapped for the new load; without it
        that is an ``AdapterConflictError``.
        """
        directory = self._folder(name)
        with self._lock:
            if name in self._adapters and not replace:
                raise AdapterConflictError(f"adapter {name!r} is already loaded; unload it first or replace it")
        try:
            adapter = self._load(name, directory)
        except Exception as exc:  # any failure of one folder is that folder's problem, never the server's
            if not isinstance(exc, CheckpointError | ValueError | OSError):
                logger.exception("unexpected error loading checkpoint %r", name)
            message = self._client_message(str(exc))
            with self._lock:
                self._failures[name] = message
            raise AdapterLoadError(f"checkpoint {name!r} cannot be loaded: {message}") from exc
        with self._lock:
            self._failures.pop(name, None)
            old = self._adapters.get(name)
            self._adapters[name] = adapter
        if old is not None:
            self._release(old)
        logger.info("loaded adapter %r (%s) on %s, slot %d", name, adapter.meta.method, adapter.base.key, adapter.slot)
        return adapter.info

    def unload(self, name: str) -> None:
        """Remove an adapter; rows already prepared for it get ``AdapterUnloadedError`` from the engine."""
        with self._lock:
            adapter = self._adapters.pop(name, None)
        if adapter is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        self._release(adapter)
        logger.info("unloaded adapter %r", name)

    # ---- internals ----------------------------------------------------------------------------

    def _folder(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            shown = repr(name)[:70]
            raise InvalidRequestError(
                f"invalid adapter name {shown}: use 1-64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        root = self.model_dir.resolve()
        directory = (self.model_dir / name).resolve()
        if directory.parent != root:
            raise InvalidRequestError(f"adapter {name!r} resolves outside the model directory")
        if not (directory / CONFIG_FILE).is_file():
            raise UnknownAdapterError(f"no checkpoint named {name!r} in the model directory")
        return directory

    def _client_message(self, message: str) -> str:
        """Error text without server paths: paths under the model directory become relative."""
        for prefix in {str(self.model_dir.resolve()), str(self.model_dir)}:
            message = message.replace(prefix + "/", "").replace(prefix, ".")
        return message

    def _load(self, name: str, directory: Path) -> LoadedAdapter:
        meta = read_meta(directory)
        if meta.method == "full":
            raise CheckpointError(
                f"{name}/{CONFIG_FILE}: field 'method': a full fine-tune ('full') carries its own encoder "
                "weights and cannot share a base model; serve a lora, galora or cogalora checkpoint instead"
            )
        meta, weights = read_adapter(directory)
        base = self._base_for(meta)
        with base.lock:
            slot = base.free_slot()
            try:
                base.model.set_adapter(slot, weights, meta.labels, source=name)
            except ValueError:
                base.model.reset_adapter(slot)
                raise
            base.slots[slot] = name
        site_present = base.model.site_present(slot)
        router_hidden = meta.router.hidden if meta.router else None
        flops = FlopModel.for_slot(base.model, slot, rank=meta.rank, router_hidden=router_hidden)
        max_length = min(meta.max_length, base.max_positions)
        info = AdapterInfo(
            name=name,
            base_model=meta.base_model,
            method=meta.method,
            labels=list(meta.labels),
            tau=meta.tau,
            max_length=max_length,
            total_adapters=sum(site_present),
            site_names=base.site_names,
            metrics=dict(meta.metrics),
        )
        return LoadedAdapter(
            name=name,
            meta=meta,
            base=base,
            slot=slot,
            generation=next(self._generations),
            max_length=max_length,
            site_present=site_present,
            flops=flops,
            info=info,
        )

    def _base_for(self, meta: CheckpointMeta) -> BaseModel:
        key = resolve_base_model(meta.base_model)
        with self._lock:
            base = self._bases.get(key)
        if base is not None:
            return base
        base = self._new_base(key, meta)  # slow: outside the lock, so requests keep flowing
        with self._lock:
            # Two loads may race to create the same base: the first one stored wins.
            return self._bases.setdefault(key, base)

    def _new_base(self, key: str, meta: CheckpointMeta) -> BaseModel:
        # Every adapter site kind is injected so that adapters with other target modules fit too.
        config = CoGaLoRAConfig(
            method="cogalora",
            rank=meta.rank,
            alpha=meta.alpha,
            target_modules=ALL_MODULE_KINDS,
            router_hidden=meta.router.hidden if meta.router else 4,
            head_modules=tuple(meta.head_modules) or None,
        )
        try:
            # The encoder's own head width (a local base may ship a classifier); the head is replaced anyway.
            base_config = AutoConfig.from_pretrained(key, trust_remote_code=False)
            hf_model = load_base_model(meta.base_model, num_labels=base_config.num_labels)
            tokenizer = load_tokenizer(meta.base_model)
        except (OSError, ValueError, ImportError) as exc:
            raise CheckpointError(f"base model {meta.base_model!r} cannot be loaded ({exc})") from exc
        model = CoGaLoRAModel(hf_model, config, num_slots=1)
        model.requires_grad_(False)
        model.to(self.device).eval()
        if self.dtype is not None:
            model.to(self.dtype)
        positions = getattr(hf_model.config, "max_position_embeddings", None) or 512
        if getattr(hf_model.config, "model_type", "") in ("roberta", "xlm-roberta"):
            positions -= 2  # RoBERTa position ids start after the padding index
        tokenizer_max = getattr(tokenizer, "model_max_length", positions) or positions
        logger.info("loaded base model %s (%d adapter sites)", key, len(model.sites))
        return BaseModel(key=key, model=model, tokenizer=tokenizer, max_positions=min(positions, tokenizer_max))

    def _release(self, adapter: LoadedAdapter) -> None:
        base = adapter.base
        with base.lock:
            if base.slots.get(adapter.slot) == adapter.name:
                del base.slots[adapter.slot]
                base.model.reset_adapter(adapter.slot)
