"""The compiled per-token steps of :mod:`cogalora.int8` (``cogalora/int8_rows.c``), where they apply.

A one-sentence forward quantizes token rows about 36 times and turns int32 sums back into floats
about 50 times; in torch operations each costs 6-11 kernel calls on a few dozen rows, and their
dispatch costs more than their arithmetic. The C functions do each in one call, with the same bits
(see the C file): an int8 forward of one sentence runs about 10 % faster, one of 32 about 13 %
(``python -m benchmarks.engine --dtype int8 --threads 1``, variant (f)). :func:`quantize_rows` and
:func:`dequantize` return None where they do not apply, and the caller runs the torch path:

- the library was not built (no C compiler at install time), was built from another version of the C
  file (an editable install not rebuilt since), or :func:`select` chose ``torch``;
- the tensors are not contiguous, not on the CPU, or not of the dtypes the C functions take;
- quantizing only: torch runs with several threads and the tensor is large. The C loops use one
  thread, torch's kernels all of them; from about 170 rows of 384 values two torch threads quantize
  faster (dequantizing, the C loop stays faster than two threads at every size measured, up to 1,000
  rows of 1,536). The results are the same bits either way, so the choice is free.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import logging
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Kernels = Literal["native", "torch"]

#: Above this many elements, and with more than one torch thread, torch's threaded kernels quantize faster.
SINGLE_THREAD_ELEMENTS = 1 << 16

_LIBRARY_STEM = "_int8_rows"
SOURCE_NAME = "int8_rows.c"
_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64


def _load() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{_LIBRARY_STEM}{suffix}"
        if path.is_file():
            break
    else:
        log.info("cogalora/int8_rows.c was not built (no C compiler at install?): int8 steps run as torch operations")
        return None
    library = ctypes.CDLL(str(path))
    if not built_from(library, here / SOURCE_NAME):
        log.warning(
            "%s was built from another version of cogalora/int8_rows.c: int8 steps run as torch operations "
            "until the project is installed again (pip install -e .)",
            path.name,
        )
        return None
    library.cogalora_quantize_rows.argtypes = [_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _POINTER]
    library.cogalora_quantize_rows.restype = None
    library.cogalora_dequantize.argtypes = [_POINTER, _SIZE, _SIZE, *[_POINTER] * 4, _SIZE, _POINTER, _SIZE]
    library.cogalora_dequantize.argtypes += [_POINTER, _POINTER]
    library.cogalora_dequantize.restype = ctypes.c_int
    return library


def built_from(library: ctypes.CDLL, source: Path) -> bool:
    """Whether ``library`` was built from ``source`` as it is now (setup.py compiles the digest in); True
    when the source is not there to compare (an installed wheel)."""
    try:
        digest = library.cogalora_source_digest
    except AttributeError:  # built before the digest existed
        return False
    if not source.is_file():
        return True
    digest.restype = ctypes.c_char_p
    return digest().decode() == hashlib.sha256(source.read_bytes()).hexdigest()[:16]


_built = _load()
_library = _built


def kernels(choice: Kernels = "native") -> Kernels:
    """What runs the per-token int8 steps on the CPU when ``choice`` is asked for: ``native`` where built."""
    return "native" if choice == "native" and _built is not None else "torch"


def select(choice: Kernels) -> Kernels:
    """Run the per-token int8 steps of this process with ``choice`` (where it applies); returns what runs."""
    global _library
    _library = _built if kernels(choice) == "native" else None
    return kernels(choice)


def _applies(*tensors: Tensor) -> bool:
    return _library is not None and all(t.is_cpu and t.is_contiguous() for t in tensors)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(codes, scale, mid)`` of :func:`cogalora.int8.quantize_rows` for ``[n, k]`` float32 ``x``, or None."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] == 0 or not _applies(x):
        return None
    if x.numel() > SINGLE_THREAD_ELEMENTS and torch.get_num_threads() > 1:
        return None
    n, k = x.shape
    codes = torch.empty((n, k), dtype=torch.int8)
    scale = torch.empty((n, 1))
    mid = torch.empty((n, 1))
    _library.cogalora_quantize_rows(x.data_ptr(), n, k, codes.data_ptr(), scale.data_ptr(), mid.data_ptr())
    return codes, scale, mid


def dequantize(
    acc: Tensor,
    scale: Tensor,
    mid: Tensor,
    weight_scale: Tensor,
    weight_sum: Tensor,
    bias: Tensor | None,
    weight_rows: Tensor | None = None,
) -> Tensor | None:
    """:func:`cogalora.int8.dequantize` for int32 ``acc`` ``[n, m]``, or None.

    ``scale`` and ``mid``: ``[n, 1]``; ``bias``: ``[m]``. ``weight_scale`` and ``weight_sum``: ``[m]`` (one row
    for all), ``[n, m]`` (one per row), or ``[g, m]`` with ``weight_rows`` (int64 ``[n]``: the row each takes).
    """
    if acc.dtype != torch.int32 or acc.dim() != 2:
        return None
    n, m = acc.shape
    floats = (scale, mid, weight_scale, weight_sum) if bias is None else (scale, mid, weight_scale, weight_sum, bias)
    if any(t.dtype != torch.float32 for t in floats) or scale.numel() != n or mid.numel() != n:
        return None
    if weight_scale.shape != weight_sum.shape or (bias is not None and bias.shape != (m,)):
        return None
    if weight_rows is not None:  # [g, m], the row each takes
        if weight_rows.dtype != torch.int64 or weight_rows.shape != (n,) or weight_scale.dim() != 2:
            return None
        step, indexed = 0, (weight_rows,)
    elif weight_scale.shape in ((m,), (n, m)):  # one row for all, or one per row
        step, indexed = int(weight_scale.dim() == 2), ()
    else:
        return None
    if weight_scale.shape[-1] != m or not _applies(acc, *floats, *indexed):
        return None
    out = torch.empty((n, m))
    status = _library.cogalora_dequantize(
        acc.data_ptr(),
        n,
        m,
        scale.data_ptr(),
        mid.data_ptr(),
        weight_scale.data_ptr(),
        weight_sum.data_ptr(),
        weight_scale.shape[0] if weight_scale.dim() == 2 else 1,
        None if weight_rows is None else weight_rows.data_ptr(),
        step,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
    )
    return out if status == 0 else None  # an index out of range: the torch path raises
