"""Packed tokens: an int8 model's encoder layers run the real tokens only, with each row's bits alone."""

from __future__ import annotations

import weakref
from dataclasses import replace

import pytest
import torch
from conftest import batch, randomize_adapter, spread_routers, tiny_model

from cogalora import CoGaLoRAConfig
from cogalora.attention import LengthGroups
from cogalora.packing import TokenLayout

CPU = torch.device("cpu")


def test_a_layout_packs_group_after_group_and_unpacks_with_zeros_at_the_padding() -> None:
    groups = LengthGroups.from_lengths([4, 2, 4, 3])  # rows 0 and 2 share a length: one block
    layout = TokenLayout(replace(groups, packed=True), width=5, device=CPU)
    hidden = torch.arange(4 * 5, dtype=torch.float32).view(4, 5, 1)
    packed = layout.pack(hidden)
    assert packed.shape == (1, 13, 1)
    assert packed.flatten().tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 5, 6, 15, 16, 17]
    real = torch.arange(5)[None, :] < torch.tensor([4, 2, 4, 3])[:, None]
    assert torch.equal(layout.unpack(packed), hidden * real[..., None])
    assert layout.row_of_token.tolist() == [0, 0, 0, 0, 2, 2, 2, 2, 1, 1, 3, 3, 3]
    assert layout.blocks == ([0, 2, 1, 3], [4, 4, 2, 3])
    index, counts = layout.tokens_of(torch.tensor([2, 1]))
    assert index.tolist() == [4, 5, 6, 7, 8, 9] and counts.tolist() == [4, 2]

    padded = TokenLayout(groups, width=5, device=CPU)
    index, counts = padded.tokens_of(torch.tensor([2, 1]))
    assert index.tolist() == [10, 11, 12, 13, 5, 6] and counts.tolist() == [4, 2]
    assert padded.row_of_token.tolist() == [row for row in range(4) for _ in range(5)]
    assert padded.blocks == ([0, 1, 2, 3], [5, 5, 5, 5])


def two_adapter_model(precision: str):
    """A tiny sdpa model with a routed rank-4 adapter in slot 0 and a routed rank-8 one in slot 1."""
    first = tiny_model(CoGaLoRAConfig(rank=4, router_init_bias=0.0), attn_implementation="sdpa")
    second = tiny_model(CoGaLoRAConfig(rank=8, router_init_bias=0.0), labels=("a", "b", "c"), seed=1)
    for adapter, seed in ((first, 3), (second, 5)):
        randomize_adapter(adapter, seed=seed)
        spread_routers(adapter)
    model = tiny_model(CoGaLoRAConfig(rank=4), attn_implementation="sdpa", seed=0).eval()
    model.set_adapter(0, first.adapter_weights(), ["neg", "pos"])
    model.set_adapter(1, second.adapter_weights(), ["a", "b", "c"])
    return model.set_precision(precision)


@pytest.mark.parametrize("precision", ["int8", "float32"])
def test_int8_packs_its_tokens_and_every_row_keeps_its_bits_alone(precision: str) -> None:
    """In int8 the first site sees ``[1, N, d]`` (N real tokens) and every row's logits, gates and ranks
    are those of the row alone (a padding-free, unpacked forward); float32 keeps the padded layout."""
    model = two_adapter_model(precision)
    assert model.packs_tokens == (precision == "int8")
    lengths = [9, 2, 17, 9, 5, 30, 1, 2]  # unsorted, repeated: blocks of several rows and gathered groups
    slots = [0, 1, 1, 0, 1, 0, 0, 1]
    taus = [0.5, 0.3, 0.5, 0.7, 0.5, 0.5, 0.2, 0.5]
    ids, mask = batch(lengths, seed=4)
    seen: list[tuple[int, ...]] = []
    hook = model.layers[0].register_forward_pre_hook(lambda layer, args: seen.append(tuple(args[0].shape)))
    try:
        with torch.inference_mode():
            together = model(ids, mask, slots=slots, taus=taus)
            seen_together = seen[0]
            alone = [
                model(ids[row : row + 1, :length], mask[row : row + 1, :length], slots=[slot], taus=[tau])
                for row, (length, slot, tau) in enumerate(zip(lengths, slots, taus, strict=True))
            ]
    finally:
        hook.remove()
    hidden = model.layers[0].base.in_features
    assert seen_together == ((1, sum(lengths), hidden) if precision == "int8" else (len(lengths), max(lengths), hidden))
    assert together.gates.any() and not together.gates.all(), "needs a mix of gates on and off"
    for row, single in enumerate(alone):
        labels = 2 if slots[row] == 0 else 3
        assert torch.equal(together.gates[row], single.gates[0]), row
        assert torch.equal(together.ranks[row], single.ranks[0]), row
        if precision == "int8":
            assert torch.equal(together.logits[row, :labels], single.logits[0, :labels]), row
        else:
            assert torch.allclose(together.logits[row, :labels], single.logits[0, :labels], rtol=0, atol=1e-5), row


def test_a_forward_lets_each_layers_activations_go_when_the_layer_is_done() -> None:
    """The routing state reuses a site's quantized and pooled input only for the sites right after it (q, k
    and v read one tensor): by the time the last layer runs, no input of the first layer's sites is alive.
    Holding them all to the end of the forward kept every layer's activations in memory at once."""
    model = two_adapter_model("int8")
    lengths, slots, taus = [9, 2, 17, 5], [0, 1, 1, 0], [0.5, 0.3, 0.5, 0.2]
    ids, mask = batch(lengths, seed=4)
    first_layer_inputs: list[weakref.ref] = []
    alive_in_last_layer: list[int] = []
    last_layer = max(site.site.layer for site in model.layers)

    def watch(site, args) -> None:
        if site.site.layer == 0:
            first_layer_inputs.append(weakref.ref(args[0]))
        elif site.site.layer == last_layer:
            alive_in_last_layer.append(sum(ref() is not None for ref in first_layer_inputs))

    hooks = [site.register_forward_pre_hook(watch) for site in model.layers]
    try:
        with torch.inference_mode():
            output = model(ids, mask, slots=slots, taus=taus)
    finally:
        for hook in hooks:
            hook.remove()
    assert output.gates.any(), "adapters ran: their steps read the cached inputs"
    assert len(first_layer_inputs) == 6 and alive_in_last_layer
    # The state keeps the last input it quantized until a site reads another: the first layer's last one, at
    # most, until the last layer's first site quantizes its own.
    assert max(alive_in_last_layer) <= 1 and alive_in_last_layer[-1] == 0
