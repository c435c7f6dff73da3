"""The catalogue: which adapters the model directory offers, and why some folders cannot be served.

Metadata only: :meth:`Catalogue.scan` reads every folder's ``cogalora.json`` (or PEFT
``adapter_config.json``) and its safetensors *headers* (shapes and dtypes, no tensor data) and the
base model's config. No weights are loaded here; that is the resident-adapter cache's job
(``service.repository``). Both processes of the service keep a catalogue: the API process to
resolve names, tokenize and answer ``/adapters``; the engine process to load what requests need.

A checkpoint folder is one with ``cogalora.json`` or a plain PEFT LoRA folder (``adapter_config.json``,
read by ``cogalora.peft_folder``); a folder with adapter files that is neither is listed as
unavailable with the reason, never skipped silently. Thread-safe.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from cogalora import ALL_MODULE_KINDS, CheckpointError, CheckpointMeta, read_adapter, read_meta, resolve_base_model
from cogalora.architectures import site_name
from cogalora.checkpoint import CONFIG_FILE, PEFT_CONFIG_FILE, looks_like_checkpoint
from service.errors import AdapterLoadError, AdapterRequiredError, InvalidRequestError, UnknownAdapterError
from service.schemas import ADAPTER_NAME_PATTERN, AdapterInfo
from service.uploads import recover_interrupted

logger = logging.getLogger(__name__)

_NAME = re.compile(ADAPTER_NAME_PATTERN)

UNSERVED_METHODS: tuple[str, ...] = ("hyperlora",)
"""Methods the training side produces for study only: the catalogue refuses them with a clear error."""


@dataclass(frozen=True)
class BaseSpec:
    """What the catalogue needs to know about a base model without loading its weights."""

    key: str
    """The resolved base-model id or path: adapters with the same key share one encoder."""
    num_layers: int
    max_positions: int


@dataclass
class CatalogueEntry:
    """One servable checkpoint folder."""

    name: str
    directory: Path
    meta: CheckpointMeta
    spec: BaseSpec
    info: AdapterInfo
    revision: str = ""
    """Which files it was read from (``folder_revision``): a request tokenized for one revision is never
    answered by another load's weights (a replacement swapped meanwhile: ``AdapterReplacedError``)."""
    error: str | None = None
    """Why its last load failed (its requests fail fast with it until an admin reloads it)."""


def folder_revision(directory: Path) -> str:
    """A fingerprint of a folder's files (names, sizes, modification times): every process that reads
    the same folder computes the same one, and an install or replacement (new files) changes it."""
    digest = hashlib.blake2b(digest_size=8)
    for path in sorted(directory.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def check_model_dir(model_dir: Path, allow_empty: bool = False) -> None:
    """Raise ``ValueError`` (``FileNotFoundError`` when absent) unless ``model_dir`` is a folder of checkpoint
    folders; the message names the problem and the fix. ``allow_empty``: a folder with none yet is fine."""
    flag = "--model-dir (or COGALORA_MODEL_DIR)"
    if not model_dir.exists():
        raise FileNotFoundError(f"model directory {model_dir} does not exist: point {flag} at a folder of checkpoints")
    if not model_dir.is_dir():
        raise ValueError(f"model directory {model_dir} is a file: point {flag} at a folder of checkpoint folders")
    if looks_like_checkpoint(model_dir):
        parent = model_dir.resolve().parent
        raise ValueError(
            f"model directory {model_dir} is one checkpoint, not a folder of checkpoints: serve its parent "
            f"(--model-dir {parent}, adapter {model_dir.resolve().name!r}), or copy it into a folder of its own "
            f"(mkdir repo && cp -r {model_dir} repo/)"
        )
    if allow_empty or any(looks_like_checkpoint(folder) for folder in model_dir.iterdir()):
        return
    problem = (
        f"model directory {model_dir} holds no checkpoint folder "
        f"(a folder with {CONFIG_FILE}, or a PEFT adapter's {PEFT_CONFIG_FILE})"
    )
    nested = sorted(folder for folder in model_dir.iterdir() if folder.is_dir() and _holds_checkpoints(folder))
    if nested:
        raise ValueError(f"{problem}, but {nested[0]} does: use --model-dir {nested[0]}")
    raise ValueError(
        f"{problem}: train one with `python -m training train` or put a PEFT adapter folder in it, or set "
        "COGALORA_ALLOW_EMPTY_MODEL_DIR=true to start empty and add adapters with PUT /adapters/{name}"
    )


def _holds_checkpoints(folder: Path) -> bool:
    try:
        return any(looks_like_checkpoint(child) for child in folder.iterdir())
    except OSError:
        return False


def load_failed(name: str, reason: str) -> AdapterLoadError:
    return AdapterLoadError(f"{_failed_prefix(name)}{reason}")


def failure_reason(name: str, error: AdapterLoadError) -> str:
    """The reason a load error of ``name`` gives (its message without the adapter's name)."""
    return error.message.removeprefix(_failed_prefix(name))


def _failed_prefix(name: str) -> str:
    return f"adapter {name!r} failed to load: "


class Catalogue:
    """The servable checkpoint folders under ``model_dir``, and the reasons for the others."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir).expanduser()
        self._entries: dict[str, CatalogueEntry] = {}
        self._failures: dict[str, str] = {}
        self._specs: dict[str, BaseSpec] = {}
        self._lock = threading.RLock()

    def scan(self, recover: bool = True) -> dict[str, str]:
        """(Re)read every checkpoint folder's metadata and weight headers; returns name -> why it is
        not servable. Folders without adapter files, and hidden ones (runtime installs in progress,
        ``service.uploads``), are not checkpoints and are ignored. ``recover``: first finish or undo
        installs a crash interrupted (only the process that writes installs may)."""
        check_model_dir(self.model_dir, allow_empty=True)
        if recover:
            recover_interrupted(self.model_dir)
        names = sorted(
            p.name for p in self.model_dir.iterdir() if not p.name.startswith(".") and looks_like_checkpoint(p)
        )
        for name in names:
            try:
                self.add(name)
            except (AdapterLoadError, InvalidRequestError) as exc:
                logger.warning("%s (not served)", exc.message)
        return self.failures

    # ---- reading ------------------------------------------------------------------------------

    @property
    def failures(self) -> dict[str, str]:
        """Folder name -> why it cannot be served (found by a scan or a failed load)."""
        with self._lock:
            return dict(self._failures)

    def names(self) -> list[str]:
        """Every servable adapter."""
        with self._lock:
            return sorted(self._entries)

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            return [entry.info for _, entry in sorted(self._entries.items())]

    def entry(self, name: str) -> CatalogueEntry:
        """The servable folder ``name``; raises ``AdapterLoadError`` for a folder that cannot be served
        and ``UnknownAdapterError`` (naming a few that exist) for any other name."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                if name in self._failures:
                    raise load_failed(name, self._failures[name])
                raise UnknownAdapterError.among(name, sorted(self._entries))
            if entry.error is not None:
                raise load_failed(name, entry.error)
            return entry

    def resolve(self, requested: str | None) -> str:
        """The adapter a request means: the one named, or the only one there is."""
        with self._lock:
            if requested is not None:
                return self.entry(requested).name
            if len(self._entries) == 1:
                return next(iter(self._entries))
            raise AdapterRequiredError.among(sorted(self._entries))

    # ---- changing -----------------------------------------------------------------------------

    def validate(self, directory: Path) -> tuple[CheckpointMeta, BaseSpec]:
        """What a scan checks of one folder (metadata, weight headers, servable method, base model);
        raises ``CheckpointError`` (or what a library raised) naming the file and the field."""
        meta = read_meta(directory)
        config_file = f"{directory.name}/{CONFIG_FILE}"
        if meta.method == "full":
            raise CheckpointError(
                f"{config_file}: field 'method': a full fine-tune ('full') carries its own encoder "
                "weights and cannot share a base model; serve a lora, galora or cogalora checkpoint instead"
            )
        if meta.method in UNSERVED_METHODS:
            raise CheckpointError(
                f"{config_file}: field 'method': {meta.method!r} is a training-side study method "
                "(the generated-scale hypernetwork variant) that this service does not serve; "
                "evaluate it with `python -m training evaluate`, or serve a lora, galora, cogalora or "
                "radlora checkpoint"
            )
        read_adapter(directory, data=False)
        return meta, self.spec(meta)

    def add(self, name: str) -> CatalogueEntry:
        """(Re)read the folder ``name`` and offer it; raises ``AdapterLoadError`` (recorded as its failure)
        when it cannot be served."""
        return self.publish(self.read(name))

    def read(self, name: str) -> CatalogueEntry:
        """The entry the folder ``name`` makes, not yet offered (:meth:`publish`); raises like :meth:`add`."""
        directory = self.folder(name)
        try:
            revision = folder_revision(directory)
            meta, spec = self.validate(directory)
        except Exception as exc:  # any failure of one folder is that folder's problem, never the server's
            raise self.failed(name, exc) from exc
        kinds = [kind for kind in ALL_MODULE_KINDS if kind in meta.target_modules]  # the encoder's site order
        sites = [site_name(layer, kind) for layer in range(spec.num_layers) for kind in kinds]
        present = set(meta.sites or sites)
        info = AdapterInfo(
            name=name,
            base_model=meta.base_model,
            method=meta.method,
            labels=list(meta.labels),
            tau=meta.tau,
            max_length=min(meta.max_length, spec.max_positions),
            total_adapters=len(sites),
            sites=sites,
            dropped_sites=[name for name in sites if name not in present],
            rank=meta.rank,
            rank_set=meta.rank_set if meta.method == "radlora" else None,
            loaded=False,
            metrics=dict(meta.metrics),
        )
        return CatalogueEntry(name=name, directory=directory, meta=meta, spec=spec, info=info, revision=revision)

    def publish(self, entry: CatalogueEntry) -> CatalogueEntry:
        """Offer ``entry`` under its name (replacing the entry read before)."""
        with self._lock:
            self._entries[entry.name] = entry
            self._failures.pop(entry.name, None)
        return entry

    def failed(self, name: str, exc: Exception) -> AdapterLoadError:
        """Record why ``name`` cannot be served; the error to raise."""
        if not isinstance(exc, CheckpointError | ValueError | OSError):
            logger.exception("unexpected error reading checkpoint %r", name)
        message = self.client_message(str(exc))
        self.mark_failed(name, message)
        return load_failed(name, message)

    def mark_failed(self, name: str, reason: str) -> None:
        """Record that ``name`` cannot be served, and why."""
        with self._lock:
            self._failures[name] = reason
            entry = self._entries.get(name)
            if entry is not None:  # read fine, failed to load: its requests fail fast until reloaded
                entry.error = reason

    def remove(self, name: str) -> bool:
        """Forget ``name`` (servable or not); whether it was known."""
        with self._lock:
            known = name in self._entries or name in self._failures
            self._entries.pop(name, None)
            self._failures.pop(name, None)
            return known

    def folder(self, name: str) -> Path:
        """The checkpoint folder ``model_dir/name``; refuses names that are not plain folder names."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            shown = repr(name)[:70]
            raise InvalidRequestError(
                f"invalid adapter name {shown}: use 1-64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        root = self.model_dir.resolve()
        directory = (self.model_dir / name).resolve()
        if directory.parent != root:
            raise InvalidRequestError(f"adapter {name!r} resolves outside the model directory")
        if not looks_like_checkpoint(directory):
            raise UnknownAdapterError(f"no checkpoint named {name!r} in the model directory")
        return directory

    def client_message(self, message: str) -> str:
        """Error text without server paths: paths under the model directory become relative."""
        for prefix in {str(self.model_dir.resolve()), str(self.model_dir)}:
            message = message.replace(prefix + "/", "").replace(prefix, ".")
        return message

    def spec(self, meta: CheckpointMeta) -> BaseSpec:
        from transformers import AutoConfig

        key = resolve_base_model(meta.base_model)
        with self._lock:
            spec = self._specs.get(key)
        if spec is not None:
            return spec
        try:
            config = AutoConfig.from_pretrained(key, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"base model {meta.base_model!r} cannot be loaded ({exc})") from exc
        positions = getattr(config, "max_position_embeddings", None) or 512
        if getattr(config, "model_type", "") in ("roberta", "xlm-roberta"):
            positions -= 2  # RoBERTa position ids start after the padding index
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", 0)
        spec = BaseSpec(key=key, num_layers=layers, max_positions=positions)
        with self._lock:
            return self._specs.setdefault(key, spec)


class CatalogueReads:
    """The catalogue's reading methods, for a repository built around one (``self.catalogue``): what the
    routes read, each adapter marked ``loaded`` as the repository's ``loaded_names`` says."""

    catalogue: Catalogue

    def loaded_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def model_dir(self) -> Path:
        return self.catalogue.model_dir

    @property
    def failures(self) -> dict[str, str]:
        return self.catalogue.failures

    def names(self) -> list[str]:
        return self.catalogue.names()

    def resolve(self, requested: str | None) -> str:
        return self.catalogue.resolve(requested)

    def validate(self, directory: Path) -> tuple[CheckpointMeta, BaseSpec]:
        return self.catalogue.validate(directory)

    def adapters(self) -> list[AdapterInfo]:
        loaded = set(self.loaded_names())
        return [info.model_copy(update={"loaded": info.name in loaded}) for info in self.catalogue.infos()]

    def info(self, name: str) -> AdapterInfo:
        return self.catalogue.entry(name).info.model_copy(update={"loaded": name in self.loaded_names()})
