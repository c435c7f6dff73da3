"""Precisions, and the exact integer products of ``int8``: a row's result never depends on its batch."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapter, spread_routers, tiny_model
from torch import nn

from cogalora import CoGaLoRAConfig
from cogalora.bank import AdapterBank
from cogalora.int8 import Int8Linear, QuantizedRows, int_matmul, quantize_rows
from cogalora.precision import PRECISION_CHOICES, PRECISIONS, resolve_precision


def test_auto_is_the_exact_integer_precision_on_cpu() -> None:
    assert resolve_precision("auto", "cpu").integer_products
    assert resolve_precision("auto", "meta").name == "float32", "no integer products there"
    assert resolve_precision("bfloat16", "cpu").half and not resolve_precision("bfloat16").integer_products
    assert set(PRECISION_CHOICES) == {"auto", *PRECISIONS}
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        resolve_precision("int3")


def test_int_matmul_is_exact_for_any_shape() -> None:
    generator = torch.Generator().manual_seed(0)
    for m, k, n in [(1, 384, 8), (5, 4, 1536), (33, 1536, 384), (2, 3, 5)]:
        a = torch.randint(-128, 128, (m, k), generator=generator, dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), generator=generator, dtype=torch.int8)
        assert torch.equal(int_matmul(a, b), (a.long() @ b.long()).int())


def test_quantized_rows_reconstruct_each_row_within_half_a_step() -> None:
    x = torch.randn(7, 384) * torch.tensor([0.01, 1.0, 30.0, 1.0, 1.0, 5.0, 1.0])[:, None]
    x[3] = 2.5  # a constant row: no division by zero, reconstructed exactly
    rows = quantize_rows(x)
    assert rows.values.dtype == torch.int8 and rows.values.abs().max() <= 127
    restored = rows.mid + rows.scale * rows.values.float()
    assert ((restored - x).abs() <= rows.scale * 0.5001).all(), "each row keeps its own scale"
    assert torch.equal(restored[3], x[3])


def test_int8_linear_is_close_to_float_and_bitwise_independent_of_the_batch() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(384, 1536)
    layer = Int8Linear(linear)
    x = torch.randn(100, 384)
    together = layer(x)
    relative = (together - linear(x)).norm() / linear(x).norm()
    assert relative < 0.02, f"int8 error {relative:.4f} of the output's norm"
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for size in (1, 3, 17, 33, 64, 100):
                for row in (0, size // 2, size - 1):
                    start = max(0, row - size + 1)
                    batch = layer(x[start : start + size])
                    assert torch.equal(batch[row - start], together[row]), (count, size, row)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rank", [8, 3])
def test_a_stacked_product_for_many_adapters_gives_each_token_its_own_adapters_bits(rank: int) -> None:
    """Forty tokens of five adapters, in blocks that interleave them, in one stacked product pair: each
    token's update is the bits of its own adapter's product pair (at the bank's rank and a nested one)."""
    torch.manual_seed(0)
    bank = AdapterBank(384, 1536, 8, 4, capacity=8)
    for row in range(8):
        bank.write(row, torch.randn(8, 384) * 0.1, torch.randn(1536, 8) * 0.1, 2.0, None)
    bank.use_integer_products()
    count = 40
    tokens = quantize_rows(torch.randn(count, 384) * 3)
    rows = torch.tensor([6, 1, 3, 0, 5])
    # Blocks of tokens (sequences), each of one adapter: interleaved, repeated, one empty.
    block_adapters, block_tokens = [2, 0, 4, 4, 1, 0, 3, 2], [5, 9, 3, 0, 1, 6, 14, 2]
    token_adapter = torch.tensor(block_adapters).repeat_interleave(torch.tensor(block_tokens))
    start = torch.randn(count, 1536)
    stacked, separate = start.clone(), start.clone()
    bank.add_delta_exact_stacked(stacked, tokens, rows, block_adapters, block_tokens, rank)
    for token in range(count):
        one = QuantizedRows(*(t[token : token + 1] for t in tokens))
        bank_row = int(rows[token_adapter[token]])
        bank.add_delta_exact(separate[token : token + 1], one, bank_row, rank)
    assert torch.equal(stacked, separate)
    assert (stacked != start).any(dim=1).all(), "every token got an update"


def test_a_model_in_int8_serves_close_to_float32_with_float32_routers() -> None:
    trained = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0))
    randomize_adapter(trained)
    spread_routers(trained)
    model = tiny_model(seed=0).eval()
    model.set_adapter(0, trained.adapter_weights(), ["neg", "pos"])
    ids = torch.randint(5, 60, (6, 9))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        reference = model(ids, mask)
        model.set_precision("int8")
        quantized = model(ids, mask)
    assert model.precision.integer_products
    assert all(layer.integer for layer in model.layers)
    assert not any(type(module) is nn.Linear for module in model.model.modules()), "every Linear is exact"
    for layer in model.layers:
        for bank in layer.banks:
            assert bank.router_w1.dtype == torch.float32
            assert bank.integer or bank.rows_used == 0, "every bank that holds an adapter keeps int8 codes"
    assert (quantized.logits - reference.logits).abs().max() < 0.05
