"""Exact integer products: int8 weights, int8 activations quantized per token, int32 sums.

Floating-point matrix products on CPUs (and GPUs) pick their blocking, and so the order in which a
row's sums are rounded, from the number of rows: a sentence's numbers then depend on its
batch-mates. Integer sums have no rounding, so ``int8 x int8 -> int32`` gives a row the same
result in any batch, whatever kernel runs it. Everything around the product is per token:

- an activation row (one token) is quantized with its own scale and offset (asymmetric: the row's
  range ``[lo, hi]`` is mapped onto 255 levels around its midpoint), so no batch-mate and no
  padding token influences it;
- a weight is quantized once, per output channel (symmetric);
- the int32 result is turned back into float32 element by element:
  ``y = s_x * s_w * acc + mid_x * sum_k(w) + bias``.

Every element-wise step here is a single IEEE operation (subtract, multiply, add, round, convert):
such an operation gives the same bits in a vectorised loop and in its scalar tail, so an element's
value never depends on where a tensor of a given batch size happens to be cut into vectors or
among threads. (A fused multiply-add could round once in one path and twice in the other.)

Quantizing a token costs two reductions and one pass; the product costs half of a bfloat16 one on
CPUs with VNNI (``torch._int_mm`` runs on oneDNN's int8 kernels). On the CPU, quantizing and turning
sums back into floats run as compiled C functions where they were built (``cogalora.int8_kernels``):
the same operations in one call each, with the same bits as the torch operations below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cogalora import int8_kernels

#: Half the number of levels of a signed 8-bit integer used for a row's range: ``[-127, 127]``.
LEVELS = 127.0
#: Smallest scale: keeps a constant row (every value equal) from dividing by zero.
TINY = 1e-30


@dataclass(frozen=True)
class QuantizedRows:
    """Rows of a ``[n, k]`` float tensor as int8 codes: ``x ~= mid + scale * values`` per row."""

    values: Tensor
    """``[n, k]`` int8."""
    scale: Tensor
    """``[n, 1]`` float32."""
    mid: Tensor
    """``[n, 1]`` float32, the midpoint of each row's range."""

    def select(self, rows: Tensor) -> QuantizedRows:
        """The rows at positions ``rows``."""
        return QuantizedRows(*(t.index_select(0, rows) for t in self))

    def __iter__(self):
        return iter((self.values, self.scale, self.mid))


def quantize_rows(x: Tensor) -> QuantizedRows:
    """Quantize each row of ``x`` (``[n, k]``, any float dtype) on its own."""
    native = int8_kernels.quantize_rows(x)
    if native is not None:
        return QuantizedRows(*native)
    x = x.float()
    hi = x.amax(dim=1, keepdim=True)
    lo = x.amin(dim=1, keepdim=True)
    mid = (hi + lo) * 0.5
    scale = ((hi - lo) * (0.5 / LEVELS)).clamp_min_(TINY)
    codes = (x - mid).div_(scale).round_()
    return QuantizedRows(codes.to(torch.int8), scale, mid)


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for int8 ``a`` ``[m, k]`` and ``b`` ``[k, n]``, exact in int32.

    CUDA's kernels want more than 16 rows and ``k``, ``n`` multiples of 8: zero padding keeps the
    sums exact, so it is added there and cut off again.
    """
    if a.device.type != "cuda":
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    pad_m, pad_k, pad_n = max(0, 17 - m), -k % 8, -n % 8
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_n, 0, pad_k))
    return torch._int_mm(a, b)[:m, :n]


def dequantize(
    acc: Tensor,
    rows: QuantizedRows,
    weight_scale: Tensor,
    weight_sum: Tensor,
    bias: Tensor | None,
    weight_rows: Tensor | None = None,
) -> Tensor:
    """``mid * weight_sum + scale * weight_scale * acc (+ bias)``: float32 ``[n, out]`` from the int32 sums.

    ``weight_scale`` and ``weight_sum``: ``[out]`` for every row, ``[n, out]`` one per row, or ``[g, out]`` with
    ``weight_rows`` (``[n]``, int64), the one each row takes (tokens of several adapters, each its own scales).
    """
    native = int8_kernels.dequantize(acc, rows.scale, rows.mid, weight_scale, weight_sum, bias, weight_rows)
    if native is not None:
        return native
    if weight_rows is not None:
        weight_scale, weight_sum = weight_scale.index_select(0, weight_rows), weight_sum.index_select(0, weight_rows)
    out = acc.float().mul_(rows.scale).mul_(weight_scale)
    if bias is not None:
        out.add_(bias)
    return out.add_(rows.mid * weight_sum)


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A ``[out, in]`` float weight as ``(codes [out, in] int8, scale [out], sum [out])``.

    One symmetric scale per output channel; ``sum`` is the row sum of the *quantized* weight
    (``scale * sum_k codes``), so the offset term of :func:`dequantize` matches the product exactly.
    """
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / LEVELS).clamp_min_(TINY)
    codes = torch.round(weight / scale[:, None]).to(torch.int8)
    weight_sum = codes.sum(dim=1, dtype=torch.int64).float() * scale
    return codes, scale, weight_sum


class Int8Linear(nn.Module):
    """A frozen Linear layer computed with exact integer sums (float32 in, float32 out)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        codes, scale, weight_sum = quantize_weight(linear.weight)
        self.register_buffer("weight_codes", codes.t().contiguous())  # [in, out]: the layout the product wants
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_sum", weight_sum)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    @property
    def device(self) -> torch.device:
        return self.weight_codes.device

    @property
    def weight(self) -> Tensor:
        """The dequantized weight ``[out, in]`` (float32): for code that inspects a layer's weight."""
        return (self.weight_codes.t().float() * self.weight_scale[:, None]).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_quantized(quantize_rows(x.reshape(-1, self.in_features)), x.shape[:-1])

    def forward_quantized(self, rows: QuantizedRows, leading: torch.Size | tuple[int, ...]) -> Tensor:
        """The layer's output for rows quantized elsewhere (sites that read one tensor share them)."""
        acc = int_matmul(rows.values, self.weight_codes)
        out = dequantize(acc, rows, self.weight_scale, self.weight_sum, self.bias)
        return out.view(*leading, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
