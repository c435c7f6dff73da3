"""Precision choice: ``auto`` never picks a dtype whose results would depend on batching."""

from __future__ import annotations

import pytest
import torch

from cogalora import precision
from cogalora.precision import cpu_bf16_is_batch_invariant, resolve_dtype


def bf16_rows_match_alone_and_together(rows: int) -> bool:
    """MiniLM's FFN-down product (K = 1536) of every row, alone vs in a batch of ``rows``."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(384, 1536, generator=generator).bfloat16()
    inputs = torch.randn(rows, 1536, generator=generator).bfloat16()
    together = torch.nn.functional.linear(inputs, weight)
    return all(torch.equal(torch.nn.functional.linear(inputs[r : r + 1], weight)[0], together[r]) for r in range(rows))


def test_the_probe_agrees_with_an_exhaustive_check() -> None:
    # The probe looks at three rows of three batch sizes; every row of other batches must agree with it
    # wherever it says "invariant" (where it says "not", one mismatch is enough and the probe found it).
    if cpu_bf16_is_batch_invariant():
        assert all(bf16_rows_match_alone_and_together(rows) for rows in (2, 17, 33, 100))
    else:
        assert not all(bf16_rows_match_alone_and_together(rows) for rows in (33, 64, 300))


@pytest.mark.parametrize("invariant", [True, False])
def test_auto_picks_bf16_on_cpu_only_where_it_is_batch_invariant(monkeypatch, invariant: bool) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_bf16_is_batch_invariant", lambda: invariant)
    assert resolve_dtype("auto", "cpu") is (torch.bfloat16 if invariant else torch.float32)
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16, "an explicit choice is kept (with a warning)"


def test_resolve_dtype_rejects_unknown_names() -> None:
    assert resolve_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")
