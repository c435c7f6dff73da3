"""Logging setup: human-readable text or one JSON object per line (``COGALORA_LOG_FORMAT``)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

ACCESS_LOGGER = "cogalora.access"
#: Admin actions (service/auth.py): logged whatever the log level.
AUDIT_LOGGER = "cogalora.audit"

#: Attributes every LogRecord has; anything else was passed through ``extra=`` and is logged as a field.
#: (``color_message`` is uvicorn's ANSI-coloured copy of the message.)
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)
_RESERVED |= {"message", "asctime", "taskName", "color_message"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items() if key not in _RESERVED}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: msg key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        fields = " ".join(f"{key}={value}" for key, value in extras.items())
        head, sep, tail = line.partition("\n")
        return f"{head} {fields}{sep}{tail}"


def configure_logging(log_format: str = "text", level: str | int = "INFO") -> None:
    """Send every logger (uvicorn's too) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO)  # an audit trail is not a verbosity choice
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
