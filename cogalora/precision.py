"""Choosing the numeric precision of a model: ``float32``, ``bfloat16``, ``float16`` or ``auto``.

``auto`` is the fastest precision the device runs natively: bfloat16 on CPUs with native bf16
instructions (``avx512_bf16`` or AMX) and on GPUs that support it, float16 on older GPUs, float32
elsewhere. Routers always stay float32 (see :meth:`cogalora.CoGaLoRAModel.cast`).
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bfloat16 dot products natively (Linux: from /proc/cpuinfo flags)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype for a precision name; ``auto`` picks the device's fastest native one."""
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}; choose from {list(DTYPE_CHOICES)}")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32
