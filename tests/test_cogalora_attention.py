"""Padding-free attention: a row's arithmetic does not depend on its batch-mates, in any dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, randomize_adapter, spread_routers, tiny_model

from cogalora import CoGaLoRAConfig
from cogalora.attention import LengthGroups


def test_sorted_lengths_group_into_slices_and_unsorted_ones_gather() -> None:
    groups = LengthGroups.from_lengths([3, 3, 5, 7, 7, 7]).groups
    assert [(g.length, g.start, g.stop, g.rows) for g in groups] == [(3, 0, 2, None), (5, 2, 3, None), (7, 3, 6, None)]
    scattered = {g.length: g for g in LengthGroups.from_lengths([4, 9, 4]).groups}
    assert scattered[4].rows.tolist() == [0, 2]
    assert scattered[9].rows is None and (scattered[9].start, scattered[9].stop) == (1, 2)
    with pytest.raises(ValueError, match="at least one real token"):
        LengthGroups.from_lengths([3, 0])


def routed_tiny_model(dtype: torch.dtype):
    model = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0), attn_implementation="sdpa")
    randomize_adapter(model)
    spread_routers(model)
    model.eval()
    assert model.length_grouped, "the default sdpa attention must be replaced by the padding-free one"
    return model.cast(dtype)


def test_an_eager_model_keeps_its_attention() -> None:
    assert not tiny_model(attn_implementation="eager").length_grouped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_alone_and_in_a_padded_batch_agree(dtype: torch.dtype) -> None:
    # 1e-6 on logits of ~1e-2 is below one bfloat16 step: in bf16 only identical arithmetic passes
    # (masked attention over the padded width fails it).
    model = routed_tiny_model(dtype)
    lengths = [9, 2, 17, 9, 5, 30, 1]  # unsorted, repeated: both the slice and the gather path
    ids, mask = batch(lengths, seed=5)
    with torch.inference_mode():
        together = model(ids, mask)
        for row, length in enumerate(lengths):
            alone = model(ids[row : row + 1, :length], mask[row : row + 1, :length])
            assert torch.allclose(alone.logits[0].float(), together.logits[row].float(), rtol=0, atol=1e-6), row
            assert torch.equal(alone.gates[0], together.gates[row])
    assert together.gates.any() and not together.gates.all(), "needs a mix of gates on and off"


def test_padding_free_attention_equals_masked_attention_in_float32() -> None:
    grouped = routed_tiny_model(torch.float32)
    reference = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0), attn_implementation="eager")
    reference.load_state_dict(grouped.state_dict())
    reference.eval()
    ids, mask = batch([4, 12, 7, 12], seed=2)
    with torch.inference_mode():
        expected, got = reference(ids, mask), grouped(ids, mask)
    assert torch.allclose(got.logits, expected.logits, atol=1e-5)
    assert torch.equal(got.gates, expected.gates)
