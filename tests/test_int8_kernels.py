"""The compiled per-token int8 steps (``cogalora/int8_rows.c``) give the torch path's bits, where they apply."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from conftest import synthetic_checkpoint
from test_engine import scanned, sentences

from cogalora import PACKAGED_MODEL_ID, int8_kernels
from cogalora.attention import LengthGroups
from cogalora.bank import AdapterBank
from cogalora.int8 import QuantizedRows, dequantize, int_matmul, quantize_rows, quantize_weight
from cogalora.packing import TokenLayout
from service.engine import Engine

pytestmark = [
    pytest.mark.skipif(
        int8_kernels.kernels() != "native", reason="cogalora/int8_rows.c was not built (no C compiler at install)"
    ),
    # One torch thread: the compiled steps take tensors of any size (with more, torch takes the large ones).
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch):
    """Runs a function with the compiled steps switched off: the reference."""

    def run(function, *args):
        with monkeypatch.context() as patched:
            patched.setattr(int8_kernels, "_library", None)
            return function(*args)

    return run


def rows_to_quantize(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows of very different ranges, and the awkward ones: constant, all zero, one-signed, one huge value."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=generator) * torch.logspace(-3, 3, n)[:, None]
    special = [torch.full((k,), 2.5), torch.zeros(k), torch.rand(k, generator=generator) + 1.0, -torch.rand(k)]
    for row, values in zip(range(0, n, 2), special, strict=False):
        x[row] = values
    if n > 9 and k > 1:
        x[9, k // 2] = 1e6
    return x


@pytest.mark.parametrize("k", [1, 15, 16, 17, 384, 1536])
def test_quantizing_gives_the_torch_path_s_bits(torch_path, k: int) -> None:
    # 3,000 rows of 384: enough values that a quotient one ulp off would round to another code somewhere.
    for n, seed in [(1, 0), (3, 1), (12, 2), (100, 3), *([(3000, 4)] if k == 384 else [])]:
        x = rows_to_quantize(n, k, seed)
        native, reference = quantize_rows(x), torch_path(quantize_rows, x)
        for name, got, expected in zip(("values", "scale", "mid"), native, reference, strict=True):
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got, expected), (name, n, k, (got != expected).sum().item())


@pytest.mark.parametrize("with_bias", [True, False])
def test_dequantizing_gives_the_torch_path_s_bits(torch_path, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(4)
    x = rows_to_quantize(37, 384, seed=5)
    rows = quantize_rows(x)
    codes, weight_scale, weight_sum = quantize_weight(torch.randn(96, 384, generator=generator))
    bias = torch.randn(96, generator=generator) if with_bias else None
    acc = int_matmul(rows.values, codes.t())
    native = dequantize(acc, rows, weight_scale, weight_sum, bias)
    assert torch.equal(native, torch_path(dequantize, acc, rows, weight_scale, weight_sum, bias))
    # One weight row per token (the stacked adapter products), as cogalora.bank passes them.
    per_token_scale = torch.rand(37, 96, generator=generator) * 0.01
    per_token_sum = torch.randn(37, 96, generator=generator)
    native = dequantize(acc, rows, per_token_scale, per_token_sum, None)
    assert torch.equal(native, torch_path(dequantize, acc, rows, per_token_scale, per_token_sum, None))


def test_dequantizing_tokens_of_several_adapters_each_with_its_own_scales(torch_path) -> None:
    """``weight_rows``: each token takes its adapter's row of ``[g, out]`` scales (the stacked adapter products)."""
    generator = torch.Generator().manual_seed(8)
    rows = quantize_rows(rows_to_quantize(30, 64, seed=9))
    acc = torch.randint(-20000, 20000, (30, 24), dtype=torch.int32, generator=generator)
    scale, total = torch.rand(5, 24, generator=generator) * 0.01, torch.randn(5, 24, generator=generator)
    token_adapter = torch.tensor([3] * 7 + [0] * 9 + [4] * 2 + [1] * 12)
    native = dequantize(acc, rows, scale, total, None, weight_rows=token_adapter)
    assert torch.equal(native, torch_path(dequantize, acc, rows, scale, total, None, token_adapter))
    per_token = dequantize(acc, rows, scale[token_adapter], total[token_adapter], None)
    assert torch.equal(native, per_token), "the same as copying each token's scales"
    assert int8_kernels.dequantize(acc, rows.scale, rows.mid, scale, total, None, token_adapter.int()) is None
    outside = token_adapter.clone()
    outside[20] = 5  # scales have rows 0..4: no read past them; the torch path raises
    assert int8_kernels.dequantize(acc, rows.scale, rows.mid, scale, total, None, outside) is None
    with pytest.raises(IndexError):
        dequantize(acc, rows, scale, total, None, weight_rows=outside)


def serving_bank(d_in: int, d_out: int, seed: int) -> AdapterBank:
    """Six adapters of rank 8 with int8 codes, as the engine holds them."""
    generator = torch.Generator().manual_seed(seed)
    bank = AdapterBank(d_in, d_out, 8, 4, capacity=6)
    for row in range(6):
        lora_A = torch.randn(8, d_in, generator=generator) * 0.1
        bank.write(row, lora_A, torch.randn(d_out, 8, generator=generator) * 0.1, 2.0, None)
    bank.use_integer_products()
    return bank


@pytest.mark.parametrize(("d_in", "d_out"), [(384, 1536), (1536, 384), (24, 40)])
@pytest.mark.parametrize("rank", [8, 3])
def test_the_adapter_step_gives_the_torch_path_s_bits(torch_path, d_in: int, d_out: int, rank: int) -> None:
    """``out += B q(A x)`` in one compiled call: every token, some tokens, one adapter or one per token."""
    bank = serving_bank(d_in, d_out, seed=d_in + rank)
    x = quantize_rows(rows_to_quantize(37, d_in, seed=9))
    start = torch.randn(37, d_out, generator=torch.Generator().manual_seed(10))
    some = torch.tensor([0, 3, 4, 5, 17, 36])

    def step(*args):
        out = start.clone()
        bank.add_delta_exact(out, x, *args)
        return out

    for args in [(2, rank), (5, rank, some)]:
        native = step(*args)
        assert torch.equal(native, torch_path(step, *args)), args
        asked = torch.isin(torch.arange(37), some) if len(args) == 3 else torch.ones(37, dtype=torch.bool)
        asked[2] = False  # an all-zero token: A x = 0, nothing to add
        assert torch.equal((native != start).any(dim=1), asked), "the tokens asked for, and only those"
    # One adapter per token: each token's update is its own adapter's, bit for bit.
    token_rows = torch.tensor([4, 0, 0, 2, 5, 1])
    native = start.clone()
    assert bank.add_delta_exact_per_token(native, x, token_rows, some, rank)
    reference = start.clone()
    for token, row in zip(some.tolist(), token_rows.tolist(), strict=True):
        torch_path(bank.add_delta_exact, reference, x, row, rank, torch.tensor([token]))
    assert torch.equal(native, reference)


def test_the_adapter_step_refuses_tokens_and_bank_rows_out_of_range(torch_path) -> None:
    bank = serving_bank(24, 40, seed=3)
    x = quantize_rows(rows_to_quantize(5, 24, seed=4))
    out = torch.zeros(5, 40)
    buffers = bank._integer_buffers()
    assert not int8_kernels.add_delta(out, tuple(x), buffers, 6, 8, None), "bank row 6 of 6"
    assert not int8_kernels.add_delta(out, tuple(x), buffers, 1, 8, torch.tensor([0, 5])), "token 5 of 5"
    assert not int8_kernels.add_delta(out, tuple(x), buffers, torch.tensor([0, -1]), 8, torch.tensor([0, 1]))
    assert not int8_kernels.add_delta(out, tuple(x), buffers, 1, 9, None), "rank 9 of a rank-8 bank"
    assert torch.equal(out, torch.zeros(5, 40)), "nothing written"
    with pytest.raises(IndexError):  # the torch path, where the call falls back to, says what is wrong
        bank.add_delta_exact(out, x, 6, 8)


def test_one_adapter_over_many_tokens_runs_torch_s_products_and_several_adapters_stay_compiled(torch_path) -> None:
    bank = serving_bank(1536, 384, seed=12)
    tokens = int8_kernels.ONE_ADAPTER_ELEMENTS // 1536 + 1
    x = quantize_rows(rows_to_quantize(tokens, 1536, seed=13))
    out = torch.zeros(tokens, 384)
    assert not int8_kernels.add_delta(out, tuple(x), bank._integer_buffers(), 3, 8, None), "one adapter: torch"
    token_rows = torch.arange(tokens) % 6
    assert int8_kernels.add_delta(out, tuple(x), bank._integer_buffers(), token_rows, 8, None), "several: C"
    fewer = QuantizedRows(*(t[: tokens - 1] for t in x))
    assert int8_kernels.add_delta(out[: tokens - 1], tuple(fewer), bank._integer_buffers(), 3, 8, None), "at the limit"
    reference = torch.zeros(tokens, 384)
    for row in range(6):
        torch_path(bank.add_delta_exact, reference, x, row, 8, (token_rows == row).nonzero().squeeze(1))
    native = torch.zeros(tokens, 384)
    assert bank.add_delta_exact_per_token(native, x, token_rows, None)
    assert torch.equal(native, reference)


@pytest.mark.parametrize("packed", [False, True])
def test_mean_tokens_of_each_row_give_the_torch_path_s_bits(torch_path, packed: bool) -> None:
    """The routers' input: each row's tokens summed in token order, then divided by its length."""
    lengths = [3, 7, 7, 12, 1, 30, 2]
    groups = LengthGroups.from_lengths(lengths)
    groups = LengthGroups(groups.groups, groups.order, groups.lengths, packed=packed)
    layout = TokenLayout(groups, max(lengths), torch.device("cpu"))
    generator = torch.Generator().manual_seed(11)
    shape = (1, sum(lengths), 384) if packed else (len(lengths), max(lengths), 384)
    x = torch.randn(shape, generator=generator) * torch.logspace(-3, 4, 384)
    native = layout.row_means(x)
    assert torch.equal(native, torch_path(layout.row_means, x))
    assert torch.allclose(native[4], x.reshape(-1, 384)[layout.tokens_of(torch.tensor([4]))[0]][0])
    owners = layout.row_of_token
    assert int8_kernels.row_means(x.reshape(-1, 384), None, owners + 1, layout.lengths) is None, "an owner out of range"
    trained = x.clone().requires_grad_()
    assert int8_kernels.row_means(trained.reshape(-1, 384), None, owners, layout.lengths) is None, "autograd: torch"


def test_inputs_the_compiled_steps_do_not_take_run_on_torch_with_the_same_result(torch_path) -> None:
    x = rows_to_quantize(8, 64, seed=6)
    strided = x.t().contiguous().t()  # the same values, not contiguous
    assert int8_kernels.quantize_rows(strided) is None
    assert int8_kernels.quantize_rows(x.bfloat16()) is None
    assert int8_kernels.quantize_rows(x) is not None
    for a, b in zip(quantize_rows(strided), torch_path(quantize_rows, x), strict=True):
        assert torch.equal(a, b)
    rows = quantize_rows(x)
    acc = torch.randint(-5000, 5000, (8, 16), dtype=torch.int32)
    scale, total = torch.rand(16), torch.randn(16)
    assert int8_kernels.dequantize(acc, rows.scale, rows.mid, scale, total[:8], None) is None, "mismatched shape"
    assert int8_kernels.dequantize(acc.long(), rows.scale, rows.mid, scale, total, None) is None
    transposed = QuantizedRows(rows.values, rows.scale, rows.mid)
    expected = torch_path(dequantize, acc, rows, scale, total, None)
    assert torch.equal(dequantize(acc.t().contiguous().t(), transposed, scale, total, None), expected)


def test_large_rows_are_quantized_on_torch_s_threads_when_it_has_several() -> None:
    x = rows_to_quantize(400, 384, seed=7)
    assert x.numel() > int8_kernels.SINGLE_THREAD_ELEMENTS
    acc = torch.randint(-5000, 5000, (400, 384), dtype=torch.int32)
    rows, scale, total = quantize_rows(x), torch.rand(384), torch.randn(384)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert int8_kernels.quantize_rows(x) is None, "two threads: torch's kernels"
        assert int8_kernels.dequantize(acc, rows.scale, rows.mid, scale, total, None) is not None, "the C loop"
        torch.set_num_threads(1)
        assert int8_kernels.quantize_rows(x) is not None, "one thread: the C loop"
    finally:
        torch.set_num_threads(threads)


def test_a_library_built_from_another_version_of_the_source_is_refused(tmp_path) -> None:
    """An editable install whose C file moved on without a rebuild must not run the old functions."""
    library, source = int8_kernels._built, Path(int8_kernels.__file__).with_name(int8_kernels.SOURCE_NAME)
    assert int8_kernels.built_from(library, source), "this checkout's library matches its source"
    edited = tmp_path / "int8_rows.c"
    edited.write_bytes(source.read_bytes() + b"\n/* edited */\n")
    assert not int8_kernels.built_from(library, edited)
    assert int8_kernels.built_from(library, tmp_path / "absent.c"), "an installed wheel ships no source to compare"
    assert not int8_kernels.built_from(ctypes.CDLL(None), source), "a library without a digest is too old"


def test_select_switches_the_process_and_says_what_runs() -> None:
    try:
        assert int8_kernels.select("torch") == "torch"
        assert int8_kernels.quantize_rows(torch.ones(2, 4)) is None
        assert int8_kernels.select("native") == "native"
        assert int8_kernels.quantize_rows(torch.ones(2, 4)) is not None
    finally:
        int8_kernels.select("native")


@pytest.mark.integration
def test_the_engine_answers_the_same_bits_with_either_kernels(tmp_path) -> None:
    """Real MiniLM, a routed and a plain adapter, sentences alone and in a batch: scores and gates equal."""
    synthetic_checkpoint(tmp_path / "sst2", PACKAGED_MODEL_ID, ["negative", "positive"], seed=0)
    synthetic_checkpoint(tmp_path / "plain", PACKAGED_MODEL_ID, ["negative", "positive"], method="lora", seed=20)
    engine = Engine(scanned(tmp_path, precision="int8"), tune_malloc=False)
    texts = sentences(12)
    answers = {}
    try:
        for kernels in ("torch", "native"):
            int8_kernels.select(kernels)
            runs = []
            for adapter in ("sst2", "plain"):
                loaded = engine.repository.acquire(adapter)
                runs += [engine.run_batch(engine.tokenize(loaded, texts))]
                runs += [engine.run_batch(engine.tokenize(loaded, [text])) for text in texts[:4]]
                engine.repository.release(loaded)
            # Rows of both adapters in one batch: the tokens of several adapters at each site.
            both = [engine.repository.acquire(adapter) for adapter in ("sst2", "plain")]
            mixed = [row for i, text in enumerate(texts) for row in engine.tokenize(both[i % 2], [text])]
            runs += [engine.run_batch(mixed)]
            for loaded in both:
                engine.repository.release(loaded)
            rows = [row for run in runs for row in run.results]
            answers[kernels] = [(row.probabilities, row.logits, row.active_sites, row.active_ranks) for row in rows]
    finally:
        int8_kernels.select("native")
    assert answers["native"] == answers["torch"]
    assert any(sites for _, _, sites, _ in answers["native"]), "some adapters ran"
