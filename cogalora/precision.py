"""Choosing the numeric precision of a model: ``float32``, ``bfloat16``, ``float16`` or ``auto``.

``auto`` is the fastest precision the device runs natively *and batch invariantly*: bfloat16 on CPUs
with native bf16 instructions (``avx512_bf16`` or AMX) whose bf16 matrix products do not depend on
the batch size, and on GPUs that support it; float16 on older GPUs; float32 elsewhere.
Routers always stay float32 (see :meth:`cogalora.CoGaLoRAModel.cast`).
"""

from __future__ import annotations

import logging
import sys
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

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


@cache
def cpu_bf16_is_batch_invariant() -> bool:
    """Whether this CPU's bfloat16 matrix products give a row the same bits alone and in a batch.

    oneDNN picks its bf16 GEMM blocking from the number of rows; on some CPUs (measured on an
    AMX Xeon: MiniLM's FFN-down shape, K = 1536) that moves a row by one bf16 step between a batch
    of 33 and a batch of 1, which breaks batch invariance (DESIGN.md section 1). A probe of that
    shape at a few batch sizes takes milliseconds, once per process.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(384, 1536, generator=generator).bfloat16()
    inputs = torch.randn(300, 1536, generator=generator).bfloat16()
    with torch.inference_mode():
        for rows in (33, 64, 300):
            together = torch.nn.functional.linear(inputs[:rows], weight)
            for row in (0, rows // 2, rows - 1):
                if not torch.equal(torch.nn.functional.linear(inputs[row : row + 1], weight)[0], together[row]):
                    return False
    return True


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype for a precision name; ``auto`` picks the device's fastest native one."""
    device = torch.device(device)
    if name in DTYPES:
        if name == "bfloat16" and device.type == "cpu" and not cpu_bf16_is_batch_invariant():
            logger.warning(
                "bfloat16 on this CPU is not batch invariant: its matrix products round a row differently "
                "with different batch sizes, so scores may differ by one bf16 step with batch-mates; "
                "use float32 (or auto) where results must not depend on batching"
            )
        return DTYPES[name]
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}; choose from {list(DTYPE_CHOICES)}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        if cpu_bf16_is_batch_invariant():
            return torch.bfloat16
        logger.info("dtype auto: float32, because this CPU's bfloat16 matrix products are not batch invariant")
    return torch.float32
