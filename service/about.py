"""What this server is and what it serves with: the version, device, precision and threads.

The version has one home, the installed package's metadata (``version`` in pyproject.toml); the
OpenAPI document, ``GET /v2``, ``GET /info`` and the start log all read it from here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from cogalora.int8_kernels import kernels
from service.settings import Settings

NAME = "cogalora-serve"


def package_version() -> str:
    try:
        return version(NAME)
    except PackageNotFoundError:  # sources run without installing the project
        return "0+unknown"


VERSION = package_version()


def runtime(settings: Settings) -> dict[str, Any]:
    """The device, resolved precision and torch threads the engine serves with (``auto`` values resolved)."""
    device, precision = settings.resolved_device(), settings.resolved_precision()
    return {
        "version": VERSION,
        "device": device,
        "dtype": precision.name,
        "int8_kernels": kernels(settings.int8_kernels) if precision.integer_products and device == "cpu" else None,
        "engine_process": settings.engine_process,
        "engine_processes": settings.resolved_engine_processes() if settings.engine_process else 0,
        "engine_lanes": settings.resolved_engine_lanes(),
        "torch_threads": settings.resolved_torch_threads(),
    }
