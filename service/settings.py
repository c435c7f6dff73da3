"""Service configuration: one pydantic model, read from ``COGALORA_*`` environment variables and,
through :mod:`service.cli`, from the command line (one flag per field, generated from this model).

Adding a setting is adding a field here, with a ``description``: its flag, its ``--help`` line, its
environment variable and its line in ``--print-settings`` follow from the field.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cogalora.int8_kernels import Kernels
from cogalora.precision import PRECISION_CHOICES, Precision, resolve_device, resolve_precision

#: The committed model repository: ``<repo>/models`` next to the ``service`` package.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models"

ENV_PREFIX = "COGALORA_"
#: ``COGALORA_*`` variables that are not service settings: docker/compose.yaml reads them itself.
OTHER_VARIABLES = frozenset({"COGALORA_IMAGE", "COGALORA_HOST_PORT"})


class Settings(BaseSettings):
    """Every knob of the server; each field is read from ``COGALORA_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", case_sensitive=False)

    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Model repository: one checkpoint folder per adapter.")
    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    max_batch_size: int = Field(32, ge=1, description="Most rows in one engine forward.")
    max_batch_tokens: int = Field(8192, ge=1, description="Most padded tokens in one engine forward.")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="Longest a row waits for batch-mates while a lane is free. 0: a free lane takes the waiting rows "
        "at once (under load rows queue during each forward, so batches still form: same throughput at 32 clients, "
        "a lone request 6 ms sooner than with 5 ms).",
    )
    max_queue: int = Field(1024, ge=1, description="Most rows waiting; beyond it requests get 503 at once.")
    request_timeout_s: float = Field(30.0, gt=0, description="Requests not answered by then get 504.")
    max_client_batch: int = Field(64, ge=1, description="Most inputs in one request (413 beyond).")
    max_input_chars: int = Field(10_000, ge=1, description="Most characters in one input (413 beyond).")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Largest request body (413 beyond).")
    max_upload_bytes: int = Field(
        64 << 20,
        ge=1,
        description="Largest adapter archive PUT /adapters/{name} accepts, and the most its files may unpack to "
        "(413 beyond).",
    )
    api_key: SecretStr | None = Field(
        None,
        description="The inference key: when set, classification and catalogue routes need it (or a key of the key "
        "file). It never opens the admin routes.",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="Opens the routes that change what is served (load, install, replace, unload, delete); while "
        "neither it nor an admin entry of the key file exists, they answer 403 to everyone. Must differ from "
        "api_key.",
    )
    key_file: Path | None = Field(
        None,
        description="Key file (TOML, or JSON by its .json suffix): key ids -> SHA-256 of the key, the adapters each "
        "may use (fnmatch patterns), optional rates and admin flag (docs/security.md). Re-read when it changes "
        "and on SIGHUP. Setting it makes classification and catalogue routes need a key.",
    )
    catalogue_access: Literal["scoped", "admin"] = Field(
        "scoped",
        description='Who may list adapters (/adapters, /info, /console/stats, /replicas under Ray Serve): "scoped" = '
        'every caller, each seeing only the adapters its key may use; "admin" = admin keys only (403 for others).',
    )
    device: str = Field("cpu", description='Torch device; "auto" picks cuda when available.')
    dtype: Literal[PRECISION_CHOICES] = Field(
        "auto",
        description='Precision: "int8" computes every linear product with exact integer sums (int8 weights, '
        "per-token int8 activations), so a result is the same bits in any batch; float32 is the reference; "
        'bfloat16/float16 are half precision (not bitwise batch invariant). "auto": int8 on CPU and CUDA, '
        "else float32. Routers always decide in float32 (python -m benchmarks.precision measures the accuracy).",
    )
    int8_kernels: Kernels = Field(
        "native",
        description="int8 on the CPU: run the per-token steps (quantizing and dequantizing token rows, adapter "
        "steps, the routers' pooling) as the compiled C functions (native, where the install could build them) "
        "or as torch operations (torch). The same bits either way; native makes an int8 forward about 1.2x as "
        "fast.",
    )
    engine_process: bool = Field(
        True,
        description="Run the model in an engine process of its own, fed through a local socket: HTTP, JSON and "
        "tokenization then never hold up a forward (false: one process, as each Ray Serve replica runs). A dead "
        "engine process is restarted and the requests it held are sent to its successor.",
    )
    engine_lanes: int = Field(
        0,
        ge=0,
        description="Copies of the model that run forwards at once, each on its own thread(s). On CPUs two lanes of "
        "one thread use two cores better than one forward on two threads (no thread waits at another forward's "
        "barrier); the lanes share the frozen encoder, so a lane costs its adapters and its forwards' buffers. "
        "0 = auto: 2 on CPUs with at least 2 cores, else 1 (1 on GPUs).",
    )
    engine_processes: int = Field(
        0,
        ge=0,
        description="Engine processes (with engine_process), each with its own batcher and its share of the lanes; "
        "a request goes to the least busy one, and while one restarts the others serve. Forwards on threads of "
        "one process take turns at its interpreter lock, so on CPUs one process per lane runs faster (for the "
        "memory of a second interpreter and model). 0 = auto: one per lane on CPUs, 1 on GPUs.",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="Intra-op threads of each engine lane; 0 = auto: the cores but one, shared among the lanes (at "
        "least 1). Rounded down to 1, 2, 3, 4, 6 or 12: with those counts element-wise kernels cut the encoder's "
        "tensors at whole vectors, which int8's bitwise batch invariance relies on.",
    )
    max_loaded_adapters: int = Field(
        256, ge=1, description="Adapters kept in memory; beyond it the least recently used idle one is evicted."
    )
    preload_adapters: int = Field(
        16, ge=0, description="Adapters loaded (in name order) before /ready; the others load on first request."
    )
    require_all_adapters: bool = Field(
        False,
        description="Exit at start when any checkpoint folder cannot be served; off: serve the others, warn, and "
        "list the folders and their reasons in /adapters and /info.",
    )
    allow_empty_model_dir: bool = Field(
        False,
        description="Start even when the model directory holds no checkpoint yet (adapters added later with "
        "PUT or POST /adapters/{name}); off: exit with an error.",
    )
    metrics_adapter_labels: str = Field(
        "all",
        description='Per-adapter metric labels: "all", "top:N" (the N busiest, the rest "other") or a '
        'comma-separated list of adapters (the rest "other").',
    )
    shadow_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Fraction of routed rows also run with every gate on (plain LoRA, same weights) in the same "
        "engine batch (a forward of their own), to measure live how often routing changes the answer; 0 "
        "disables. The answer returned is always the routed one, bit for bit.",
    )
    drift_window: int = Field(
        1000,
        ge=0,
        description="Rows per adapter (served at its own tau) over which live per-site activation rates are "
        "compared with the checkpoint's dev-data rates for cogalora_routing_drift; 0 disables.",
    )
    console: bool = Field(
        True,
        description="Serve the web console at / (the page, its static files and /console/stats); false: those "
        "routes answer 404.",
    )
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or JSON objects.")
    log_level: str = Field("INFO", description="Root log level (DEBUG, INFO, WARNING, ...).")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503 responses.")

    @field_validator("admin_key")
    @classmethod
    def _admin_key_is_not_the_api_key(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        api_key = info.data.get("api_key")
        if _secret(value) is not None and _secret(value) == _secret(api_key):
            raise ValueError("must differ from the API key (the inference key never opens admin routes)")
        return value

    @field_validator("key_file")
    @classmethod
    def _valid_key_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """Readable, valid, and no key of it repeats a settings key: fail at start, not later."""
        from service.keyring import KeyRing

        if value is not None:  # KeyFileError is a ValueError naming the file and the field
            KeyRing(_secret(info.data.get("api_key")), _secret(info.data.get("admin_key")), value)
        return value

    @field_validator("metrics_adapter_labels")
    @classmethod
    def _known_label_mode(cls, value: str) -> str:
        from service.metrics import AdapterLabels

        AdapterLabels(value)  # raises ValueError with the accepted forms
        return value

    @classmethod
    def variable(cls, name: str) -> str:
        """The environment variable of the field ``name``: ``COGALORA_<NAME>``."""
        return f"{ENV_PREFIX}{name.upper()}"

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        levels = [name for name in logging.getLevelNamesMapping() if name not in ("NOTSET", "WARN", "FATAL")]
        if value.upper() not in levels:
            raise ValueError(f"unknown log level {value!r}; choose from {', '.join(levels)}")
        return value.upper()

    def resolved_device(self) -> str:
        """The torch device to use: ``auto`` becomes ``cuda`` when available, else ``cpu``."""
        return str(resolve_device(self.device))

    def resolved_engine_lanes(self) -> int:
        """Forwards that run at once (``0`` resolved: 2 on a CPU with at least 2 cores, else 1)."""
        if self.engine_lanes:
            return self.engine_lanes
        return 2 if self.resolved_device() == "cpu" and _cores() >= 2 else 1

    def resolved_engine_processes(self) -> int:
        """Engine processes to start (``0`` resolved: one per lane on CPUs, 1 on GPUs; at most one per lane)."""
        lanes = self.resolved_engine_lanes()
        if self.engine_processes:
            return min(self.engine_processes, lanes)
        return lanes if self.resolved_device() == "cpu" else 1

    def resolved_torch_threads(self) -> int:
        """Intra-op threads per lane (``0`` resolved: the cores but one, shared among the lanes, at least 1)."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, (_cores() - 1) // self.resolved_engine_lanes())

    def resolved_precision(self) -> Precision:
        """The precision to serve in (``auto`` resolved for the device)."""
        return resolve_precision(self.dtype, self.resolved_device())

    def api_key_value(self) -> str | None:
        """The configured API key, or None when the service is open (an empty key counts as unset)."""
        return _secret(self.api_key)

    def admin_key_value(self) -> str | None:
        """The configured admin key, or None (an empty key counts as unset)."""
        return _secret(self.admin_key)


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() or None if value is not None else None


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
