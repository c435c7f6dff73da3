"""The resident adapters: a bounded set of adapters in memory, and one shared encoder per base model.

What exists on disk is the catalogue's business (``service.catalogue``); this module loads what
requests need:

- :meth:`~ModelRepository.acquire` pins an adapter for a request, loading it first when needed;
  :meth:`~ModelRepository.release` unpins it. At most ``max_loaded`` adapters stay in memory:
  loading one more evicts the least recently used adapter that no queued or running row needs.
  When every loaded adapter is pinned, a load waits for a release.
- Adapters on the same base model live in slots of one :class:`~cogalora.CoGaLoRAModel`; each holds
  only its own LoRA matrices, routers and head. Slot changes take the encoder's lock, which the
  engine also holds for a forward, so a forward never sees a slot change half-way.
- Every load gets a fresh ``generation``: a row prepared for an adapter that an admin unloaded
  meanwhile is detected by the engine and answered with ``AdapterUnloadedError``. A replaced adapter
  (``load(name, replace=True)``) is different: its new weights go into a fresh slot, and rows pinned
  to the old load finish on the old weights, whose slot is freed once no request holds it.

Thread-safe: the event loop pins loaded adapters directly (:meth:`try_acquire`, never blocks on a
load); worker threads do the loading.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

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
    resolve_base_model,
)
from cogalora.precision import Precision, resolve_precision
from service.catalogue import Catalogue, CatalogueEntry, CatalogueReads
from service.errors import AdapterCapacityError, AdapterConflictError, AdapterLoadError, UnknownAdapterError
from service.schemas import AdapterInfo
from service.settings import Settings

logger = logging.getLogger(__name__)


class RepositoryListener(Protocol):
    """What the repository reports (the metrics implement it)."""

    def on_adapter_loaded(self, name: str, seconds: float) -> None: ...
    def on_adapter_evicted(self, name: str) -> None: ...


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


@dataclass(eq=False)
class LoadedAdapter:
    """One adapter in memory: where it lives and what a request needs to know about it."""

    name: str
    meta: CheckpointMeta
    encoder: SharedEncoder
    slot: int
    generation: int
    revision: str
    """The catalogue revision (files) it was loaded from."""
    max_length: int
    """The checkpoint's max_length, capped by the encoder's position embeddings."""
    flops: FlopModel
    total_adapters: int
    pins: int = 0
    """Requests holding it (queued or running); a pinned adapter is never evicted."""
    routed: bool = False
    """Whether any of its sites has a router (else "every gate on" is what it always runs)."""
    drift_sites: tuple[int, ...] = ()
    """Encoder site indices of its routed sites that its checkpoint has a dev activation rate for."""
    drift_reference: tuple[float, ...] = ()
    """Those sites' dev activation rates at the served tau (empty: no routing-drift reference)."""

    @property
    def labels(self) -> list[str]:
        return self.meta.labels


class ModelRepository(CatalogueReads):
    """The adapters of a :class:`~service.catalogue.Catalogue` in memory, on shared base encoders.

    The catalogue's reading methods (``names``, ``resolve``, ``adapters``, ``info``, ``failures``)
    are offered here too, with each adapter's ``loaded`` state.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        precision: Precision | str = "float32",
        max_loaded: int = Settings.model_fields["max_loaded_adapters"].default,
        listener: RepositoryListener | None = None,
        catalogue: Catalogue | None = None,
        lanes: int = 1,
    ) -> None:
        """``lanes``: copies of each base encoder, so that that many forwards run at once (:class:`Lanes`)."""
        if max_loaded < 1 or lanes < 1:
            raise ValueError(f"max_loaded and lanes must be >= 1, got {max_loaded} and {lanes}")
        self.lanes = lanes
        self.catalogue = catalogue or Catalogue(model_dir)
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.max_loaded = max_loaded
        self.listener = listener
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()
        """Least recently used first."""
        self._loading: set[str] = set()
        self._retired: list[LoadedAdapter] = []
        """Replaced loads still pinned by requests admitted before the swap (their slots are freed later)."""
        self._encoders: dict[str, SharedEncoder] = {}
        self._cond = threading.Condition(threading.RLock())
        self._generations = itertools.count(1)

    # ---- the catalogue, with what is loaded ----------------------------------------------------

    def scan(self) -> dict[str, str]:
        """Scan the model directory (``Catalogue.scan``); returns name -> why it is not servable."""
        return self.catalogue.scan()

    def loaded_names(self) -> list[str]:
        """Adapters in memory, least recently used first."""
        with self._cond:
            return list(self._loaded)

    def in_use(self) -> dict[str, int]:
        """Loaded adapters pinned by queued or running requests, and how many requests each."""
        with self._cond:
            return {name: adapter.pins for name, adapter in self._loaded.items() if adapter.pins > 0}

    def encoders(self) -> list[SharedEncoder]:
        with self._cond:
            return list(self._encoders.values())

    # ---- pinning and loading ------------------------------------------------------------------

    def try_acquire(self, name: str, revision: str = "") -> LoadedAdapter | None:
        """Pin ``name`` if it is in memory (never blocks on a load); None when it must be loaded.

        ``revision``: the catalogue revision the request was prepared for; a replaced load of that
        revision that requests still hold is pinned instead of the current one (it finishes on the
        weights it was tokenized for). The caller compares the pinned load's revision with its own."""
        with self._cond:
            self.catalogue.entry(name)  # raises for unknown names and for a folder whose last load failed
            adapter = self._loaded.get(name)
            if adapter is not None and revision and adapter.revision != revision:
                held = [old for old in self._retired if old.name == name and old.revision == revision]
                if held:
                    held[0].pins += 1
                    return held[0]
            if adapter is not None:
                adapter.pins += 1
                self._loaded.move_to_end(name)
            return adapter

    def acquire(self, name: str, timeout: float | None = None) -> LoadedAdapter:
        """Pin ``name``, loading it first when needed (blocking; call from a worker thread).

        Raises ``UnknownAdapterError``, ``AdapterLoadError`` (damaged checkpoint) or, when every
        loaded adapter stays pinned for ``timeout`` seconds, ``AdapterCapacityError``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                adapter = self.try_acquire(name)
                if adapter is not None:
                    return adapter
                if name not in self._loading:
                    room, victim = self._make_room()
                    if room:
                        self._loading.add(name)
                        entry = self.catalogue.entry(name)
                        break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise AdapterCapacityError(
                        f"all {self.max_loaded} loaded adapters are in use; retry shortly "
                        "(or raise max_loaded_adapters)",
                        retry_after=1.0,
                    )
                self._cond.wait(remaining)
        if victim is not None:
            self._release_slot(victim)
            if self.listener is not None:
                self.listener.on_adapter_evicted(victim.name)
        self._reap_retired()
        try:
            adapter = self._load(entry)
        except Exception as exc:
            error = self.catalogue.failed(name, exc)
            with self._cond:
                self._loading.discard(name)
                self._cond.notify_all()
            raise error from exc
        with self._cond:
            self._loading.discard(name)
            adapter.pins = 1
            self._loaded[name] = adapter
            self._cond.notify_all()
        return adapter

    def release(self, adapter: LoadedAdapter) -> None:
        """Unpin an adapter taken by :meth:`acquire` or :meth:`try_acquire`."""
        with self._cond:
            adapter.pins -= 1
            if adapter.pins <= 0:
                self._cond.notify_all()

    def is_current(self, adapter: LoadedAdapter) -> bool:
        """Whether ``adapter`` may still run: loaded as the same load (not unloaded, not evicted), or a
        replaced load that requests admitted before the replacement still hold."""
        return self._loaded.get(adapter.name) is adapter or adapter in self._retired

    def _reap_retired(self, name: str | None = None) -> None:
        """Free the slots of replaced loads no request holds any more (and of every one of ``name``)."""
        with self._cond:
            done = [a for a in self._retired if a.pins <= 0 or a.name == name]
            self._retired = [a for a in self._retired if a not in done]
        for adapter in done:
            self._release_slot(adapter)

    def _make_room(self) -> tuple[bool, LoadedAdapter | None]:
        """Room for one more load (under the lock); evicts the least recently used unpinned adapter."""
        if len(self._loaded) + len(self._loading) < self.max_loaded:
            return True, None
        for name, adapter in self._loaded.items():
            if adapter.pins <= 0:
                del self._loaded[name]
                logger.info("evicting adapter %r (least recently used)", name)
                return True, adapter
        return False, None

    def _load(self, entry: CatalogueEntry) -> LoadedAdapter:
        started = time.perf_counter()
        meta, weights = read_adapter(entry.directory)
        encoder = self._encoder_for(meta)
        with encoder.lanes.every() as models:
            slot = encoder.free_slot()
            for model in models:
                model.set_adapter(slot, weights, meta.labels, source=entry.name)
            encoder.slots[slot] = entry.name
            routed = encoder.model.site_routed(slot)
        reference = meta.activation_reference() or {}
        drift_sites = tuple(
            index for index, name in enumerate(encoder.site_names) if routed[index] and name in reference
        )
        adapter = LoadedAdapter(
            name=entry.name,
            meta=meta,
            encoder=encoder,
            slot=slot,
            generation=next(self._generations),
            revision=entry.revision,
            max_length=min(meta.max_length, encoder.max_positions),
            flops=FlopModel.for_slot(encoder.model, slot),
            total_adapters=entry.info.total_adapters,
            routed=any(routed),
            drift_sites=drift_sites,
            drift_reference=tuple(reference[encoder.site_names[index]] for index in drift_sites),
        )
        seconds = time.perf_counter() - started
        logger.info("loaded adapter %r (%s) into slot %d in %.1f ms", entry.name, meta.method, slot, seconds * 1e3)
        if self.listener is not None:
            self.listener.on_adapter_loaded(entry.name, seconds)
        return adapter

    def _release_slot(self, adapter: LoadedAdapter) -> None:
        encoder = adapter.encoder
        with encoder.lanes.every() as models:
            if encoder.slots.get(adapter.slot) == adapter.name:
                del encoder.slots[adapter.slot]
                for model in models:
                    model.reset_adapter(adapter.slot)

    # ---- encoders -----------------------------------------------------------------------------

    def load_encoders(self) -> list[SharedEncoder]:
        """Load the base encoder of every catalogued adapter (start-up: adapters then load fast)."""
        metas = [self.catalogue.entry(name).meta for name in self.catalogue.names()]
        for meta in metas:
            self._encoder_for(meta)
        return self.encoders()

    def _encoder_for(self, meta: CheckpointMeta) -> SharedEncoder:
        key = resolve_base_model(meta.base_model)
        with self._cond:
            encoder = self._encoders.get(key)
        if encoder is not None:
            return encoder
        encoder = self._new_encoder(key, meta)  # slow: outside the lock, so requests keep flowing
        with self._cond:
            # Two loads may race to create the same encoder: the first one stored wins.
            return self._encoders.setdefault(key, encoder)

    def _new_encoder(self, key: str, meta: CheckpointMeta) -> SharedEncoder:
        # Every adapter site kind is injected so that adapters with other target modules fit too.
        config = CoGaLoRAConfig(
            method="cogalora", target_modules=ALL_MODULE_KINDS, head_modules=tuple(meta.head_modules) or None
        )
        models = []
        try:
            # The encoder's own head width (a local base may ship a classifier); the head is replaced anyway.
            base_config = AutoConfig.from_pretrained(key, trust_remote_code=False)
            for _ in range(self.lanes):
                model = CoGaLoRAModel(load_base_model(meta.base_model, num_labels=base_config.num_labels), config)
                model.requires_grad_(False)
                model.to(self.device).eval()
                models.append(model.set_precision(self.precision))
            tokenizer = load_tokenizer(meta.base_model)
        except Exception as exc:  # unreadable weights raise the reader's own errors (e.g. SafetensorError)
            raise CheckpointError(f"base model {meta.base_model!r} cannot be loaded ({exc})") from exc
        spec = self.catalogue.spec(meta)
        tokenizer_max = getattr(tokenizer, "model_max_length", spec.max_positions) or spec.max_positions
        logger.info("loaded base model %s (%d adapter sites, %d lanes)", key, len(models[0].sites), self.lanes)
        return SharedEncoder(
            key=key, lanes=Lanes(models), tokenizer=tokenizer, max_positions=min(spec.max_positions, tokenizer_max)
        )

    # ---- admin --------------------------------------------------------------------------------

    def preload(self, count: int) -> list[str]:
        """Load up to ``count`` adapters (name order, at most ``max_loaded``); returns the loaded names."""
        for name in self.names()[: min(count, self.max_loaded)]:
            try:
                self.release(self.acquire(name))
            except AdapterLoadError as exc:
                logger.warning("%s (not served)", exc.message)
        return self.loaded_names()

    def load(self, name: str, replace: bool = False) -> AdapterInfo:
        """Admin: re-read the folder ``model_dir/name`` and load it now.

        ``replace``: an adapter of that name already in memory is swapped for the new load (requests
        admitted before the swap finish on the old weights); without it that is an
        ``AdapterConflictError``.
        """
        self.catalogue.folder(name)
        self._reap_retired()
        with self._cond:
            if name in self._loaded and not replace:
                raise AdapterConflictError(
                    f"adapter {name!r} is already loaded; to reload it from its folder, "
                    f"DELETE /adapters/{name} first, then POST /adapters/{name}"
                )
            swap = name in self._loaded
        if not swap:
            self.catalogue.add(name)
            self.release(self.acquire(name))
            return self.info(name)
        entry = self.catalogue.read(name)
        try:  # into a fresh slot, beside the old load, which keeps serving meanwhile
            adapter = self._load(entry)
        except Exception as exc:
            raise self.catalogue.failed(name, exc) from exc
        with self._cond:
            # The new entry is offered when its weights are: requests never name one and run the other.
            self.catalogue.publish(entry)
            old = self._loaded.pop(name, None)
            self._loaded[name] = adapter
            if old is not None and old.pins > 0:
                self._retired.append(old)
                old = None
            self._cond.notify_all()
        if old is not None:
            self._release_slot(old)
        return self.info(name)

    def unload(self, name: str) -> None:
        """Admin: drop ``name`` from memory and from the catalogue (or from the unavailable folders)
        until it is loaded again.

        Rows already queued for it are answered with ``AdapterUnloadedError`` by the engine.
        """
        with self._cond:
            known = self.catalogue.remove(name)
            if not known and name not in self._loaded:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded")
            adapter = self._loaded.pop(name, None)
            self._cond.notify_all()
        if adapter is not None:
            self._release_slot(adapter)
        self._reap_retired(name)
        logger.info("unloaded adapter %r", name)
