"""Service configuration from ``COGALORA_*`` environment variables (DESIGN.md §5)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The committed model repository: ``<repo>/models`` next to the ``service`` package.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models"


class Settings(BaseSettings):
    """Every knob of the server; each field is read from ``COGALORA_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="COGALORA_", extra="ignore", case_sensitive=False)

    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Model repository: one checkpoint folder per adapter.")
    host: str = Field("0.0.0.0", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    max_batch_size: int = Field(32, ge=1, description="Most rows in one engine forward.")
    max_batch_tokens: int = Field(8192, ge=1, description="Most padded tokens in one engine forward.")
    max_wait_ms: float = Field(5.0, ge=0, description="Longest a row waits for batch-mates.")
    max_queue: int = Field(1024, ge=1, description="Most rows waiting; beyond it requests get 503 at once.")
    request_timeout_s: float = Field(30.0, gt=0, description="Requests not answered by then get 504.")
    max_client_batch: int = Field(64, ge=1, description="Most inputs in one request (413 beyond).")
    max_input_chars: int = Field(10_000, ge=1, description="Most characters in one input (413 beyond).")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Largest request body (413 beyond).")
    api_key: SecretStr | None = Field(None, description="When set, /classify and /adapters need it.")
    device: str = Field("cpu", description='Torch device; "auto" picks cuda when available.')
    torch_threads: int = Field(0, ge=0, description="torch.set_num_threads; 0 keeps torch's default.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text or JSON objects.")
    log_level: str = Field("INFO", description="Root log level (DEBUG, INFO, WARNING, ...).")
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with 503 responses.")

    def resolved_device(self) -> str:
        """The torch device to use: ``auto`` becomes ``cuda`` when available, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def api_key_value(self) -> str | None:
        """The configured API key, or None when the service is open (an empty key counts as unset)."""
        if self.api_key is None:
            return None
        return self.api_key.get_secret_value() or None
