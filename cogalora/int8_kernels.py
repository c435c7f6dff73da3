"""The compiled per-token steps of the int8 forward (``cogalora/int8_rows.c``), where they apply.

A one-sentence forward quantizes token rows about 36 times, turns int32 sums back into floats about
50 times, runs an adapter's product pair at each site whose gate is on and pools each routed site's
input for its router; in torch operations each costs 6-15 kernel calls on a few dozen rows, and their
dispatch costs more than their arithmetic. The C functions do each in one call, with the same bits
(see the C file): :func:`quantize_rows`, :func:`dequantize`, :func:`add_delta` (the whole adapter step,
each token with its own adapter, so a mixed batch needs no stacked products) and :func:`row_means`
(the routers' input). With them an int8 forward runs about 1.2x as fast as with torch operations
at batches of 1, 8 and 32 sentences (``python -m benchmarks.engine --dtype int8 --threads 1``,
variant (f)). Each returns None (or False) where it does not apply, and the caller runs the torch path:

- the library was not built (no C compiler at install time), was built from another version of the C
  file (an editable install not rebuilt since), or :func:`select` chose ``torch``;
- the tensors are not contiguous, not on the CPU, or not of the dtypes the C functions take; an index
  is out of range (the torch path then raises); pooling while autograd records (training);
- quantizing only: torch runs with several threads and the tensor is large. The C loops use one
  thread, torch's kernels all of them; from about 170 rows of 384 values two torch threads quantize
  faster (dequantizing, the C loop stays faster than two threads at every size measured, up to 1,000
  rows of 1,536);
- one adapter's step over many tokens (:data:`ONE_ADAPTER_ELEMENTS`), where torch's two integer products
  are faster. The results are the same bits either way, so the choice is free.
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
#: Above this many input values (tokens x d_in), one adapter's step runs faster as torch's two integer
#: products (oneDNN's int8 kernels) than as the C loop: from about 170 tokens of 1,536 values or 600 of 384,
#: with one or two threads. Tokens of several adapters have no such alternative (the stacked products
#: took longer than the C loop at every size measured, up to 1,600 tokens).
ONE_ADAPTER_ELEMENTS = 1 << 18

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
    library.cogalora_add_delta.argtypes = [*[_POINTER] * 3, _SIZE, _SIZE, _POINTER, _SIZE, _POINTER, _SIZE, _SIZE]
    library.cogalora_add_delta.argtypes += [*[_POINTER] * 3, _SIZE, _SIZE, _POINTER, _POINTER, _SIZE, _POINTER]
    library.cogalora_add_delta.restype = ctypes.c_int
    library.cogalora_row_means.argtypes = [_POINTER, _SIZE, _SIZE, _POINTER, _POINTER, _SIZE, _POINTER, _SIZE, _POINTER]
    library.cogalora_row_means.restype = ctypes.c_int
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


def add_delta(
    out: Tensor,
    x: tuple[Tensor, Tensor, Tensor],
    bank: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    rows: int | Tensor,
    rank: int,
    tokens: Tensor | None,
) -> bool:
    """:meth:`cogalora.bank.AdapterBank.add_delta_exact` in one call: ``out[t] += B q(A x[t])`` in place.

    ``x``: ``(codes [n, k] int8, scale [n, 1], mid [n, 1])``; ``tokens`` (int64 ``[t]``, or None: every
    row) the token rows to update. ``bank``: ``(codes_A [c, r, k], scale_A [c, r], sum_A [c, r], codes_B
    [c, r, m], scale_B [c, m])``, ``codes_B`` being B's codes transposed; the first ``rank`` of the ``r``
    components are used. ``rows``: the bank row of every token (``int``) or of each (int64, one per
    updated token). False (``out`` untouched) where it does not apply: the caller runs the torch path.
    """
    codes, scale, mid = x
    codes_A, scale_A, sum_A, codes_B, scale_B = bank
    if codes.dtype != torch.int8 or codes_A.dtype != torch.int8 or codes_B.dtype != torch.int8 or codes.dim() != 2:
        return False
    n, k = codes.shape
    capacity, stride, m = codes_B.shape
    floats = (out, scale, mid, scale_A, sum_A, scale_B)
    if any(t.dtype != torch.float32 for t in floats) or out.shape != (n, m) or scale.numel() != n or mid.numel() != n:
        return False
    if codes_A.shape != (capacity, stride, k) or not scale_A.shape == sum_A.shape == (capacity, stride):
        return False
    if scale_B.shape != (capacity, m) or not 1 <= rank <= stride:
        return False
    count = n if tokens is None else tokens.shape[0]
    per_token = () if isinstance(rows, int) else (rows,)
    indexed = per_token if tokens is None else (*per_token, tokens)
    if any(t.dtype != torch.int64 or t.shape != (count,) for t in indexed):
        return False
    if per_token == () and count * k > ONE_ADAPTER_ELEMENTS:
        return False
    if not _applies(*floats, codes, codes_A, codes_B, *indexed):
        return False
    status = _library.cogalora_add_delta(
        codes.data_ptr(),
        scale.data_ptr(),
        mid.data_ptr(),
        n,
        k,
        None if tokens is None else tokens.data_ptr(),
        count,
        None if per_token == () else rows.data_ptr(),
        rows if per_token == () else 0,
        capacity,
        codes_A.data_ptr(),
        scale_A.data_ptr(),
        sum_A.data_ptr(),
        stride,
        rank,
        codes_B.data_ptr(),
        scale_B.data_ptr(),
        m,
        out.data_ptr(),
    )
    return status == 0


def row_means(x: Tensor, index: Tensor | None, owners: Tensor, lengths: Tensor) -> Tensor | None:
    """``TokenLayout.row_sums(x) / lengths``: each batch row's mean token, from float32 ``x`` ``[rows, d]``,
    the tokens ``index`` (int64, or None: every row of ``x``) and the batch row of each (``owners``), or
    None where it does not apply (also while autograd records: training pools with torch)."""
    if x.dtype != torch.float32 or x.dim() != 2 or (x.requires_grad and torch.is_grad_enabled()):
        return None
    count = x.shape[0] if index is None else index.shape[0]
    integers = (owners, lengths) if index is None else (owners, lengths, index)
    if any(t.dtype != torch.int64 or t.dim() != 1 for t in integers) or owners.shape[0] != count:
        return None
    if not _applies(x, *integers):
        return None
    batch, d = lengths.shape[0], x.shape[1]
    out = torch.empty((batch, d))
    status = _library.cogalora_row_means(
        x.data_ptr(),
        x.shape[0],
        d,
        None if index is None else index.data_ptr(),
        owners.data_ptr(),
        count,
        lengths.data_ptr(),
        batch,
        out.data_ptr(),
    )
    return out if status == 0 else None
