"""Per-row products: each batch row multiplied with its own adapter's weights, never one matrix product.

Routers and heads run as multiply-and-sums over the last dimension, one row at a time, so a row's
numbers do not depend on how many rows are computed with it (gate and rank decisions are thresholds
on them). ``rows`` picks the weights: one bank row for every batch row (an ``int``), or a ``[B]``
tensor of bank rows (gathered: the cost does not depend on how many adapters the bank holds).
"""

from __future__ import annotations

from torch import Tensor


def rows_of(weights: Tensor, rows: int | Tensor) -> Tensor:
    """``weights[rows]``: one adapter's weights (``int``) or each batch row's adapter's (``[B]``)."""
    return weights[rows] if isinstance(rows, int) else weights.index_select(0, rows)


def row_dot(x: Tensor, weight: Tensor) -> Tensor:
    """One output per row: ``x [B, d]`` with ``weight [d]`` (shared) or ``[B, d]`` (per row) -> ``[B]``."""
    return (x * weight).sum(-1)


def row_matvec(x: Tensor, weight: Tensor) -> Tensor:
    """Several outputs per row: ``x [B, d]`` with ``weight [h, d]`` (shared) or ``[B, h, d]`` -> ``[B, h]``."""
    return (x.unsqueeze(1) * weight).sum(-1)
