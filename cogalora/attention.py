"""Padding-free attention: every sequence attends over its own tokens only, in any batch.

With a padded batch, standard attention reduces over the padded width, so a sentence's numbers
depend on its longest batch-mate: harmless in float32 (~1e-7), but in bfloat16 the different
accumulation order moves logits by up to ~5e-4 and breaks batch invariance (docs/architecture.md).
Everything else in a BERT-family encoder works token by token (the Linear products are
row-invariant), so attention is the only place where padding can leak in.

:class:`LengthGroups` (built once per forward, on the host) groups the rows by real length;
attention then runs one unmasked scaled-dot-product attention per group over exactly that many
tokens, so a row computes the same arithmetic alone or in any batch: results are bitwise equal.
Padded positions get zeros (nothing reads them: pooling and routers mask them out). A batch of
one length (always at batch 1) is a single unmasked call, cheaper than the masked kernel.

When the forward packs its tokens (``cogalora.packing``: ``[1, N, ...]``, the real tokens only, group
after group), each group is one contiguous block of ``size x length`` tokens, viewed as ``size``
sequences: the same call on the same numbers as in the padded layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLEMENTATION = "cogalora_length_grouped"
"""The name under which the attention function is registered with transformers."""


@dataclass(frozen=True)
class LengthGroup:
    """Rows of one real ``length``: the slice ``start:stop`` when contiguous, else ``rows``."""

    length: int
    start: int = 0
    stop: int = 0
    rows: Tensor | None = None

    @property
    def size(self) -> int:
        """How many rows have this length."""
        return self.stop - self.start if self.rows is None else self.rows.shape[0]


@dataclass(frozen=True)
class LengthGroups:
    """The rows of a batch grouped by real length (tokens, padding excluded)."""

    groups: tuple[LengthGroup, ...]
    order: Tensor | None = None
    """Where each batch row sits when the groups' rows are concatenated in group order; ``None`` when
    that concatenation is already the batch order (rows sorted by length, as the engine sends them)."""
    lengths: tuple[int, ...] = ()
    """Each batch row's real length, in batch order."""
    packed: bool = False
    """Whether the encoder layers see the batch's tokens packed (``cogalora.packing``), not padded."""

    @property
    def in_order(self) -> bool:
        return self.order is None

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str = "cpu") -> LengthGroups:
        """Group rows by length; rows sorted by length (as the serving engine sends them) need no gather."""
        if any(length < 1 for length in lengths):
            raise ValueError("every row needs at least one real token")
        positions: dict[int, list[int]] = {}
        for row, length in enumerate(lengths):
            positions.setdefault(length, []).append(row)
        groups = []
        for length, rows in positions.items():
            if rows[-1] - rows[0] + 1 == len(rows):
                groups.append(LengthGroup(length, start=rows[0], stop=rows[-1] + 1))
            else:
                groups.append(LengthGroup(length, rows=torch.tensor(rows, device=device)))
        lengths = tuple(lengths)
        concatenated = [row for rows in positions.values() for row in rows]
        if concatenated == sorted(concatenated):
            return cls(tuple(groups), lengths=lengths)
        order = [0] * len(concatenated)
        for position, row in enumerate(concatenated):
            order[row] = position
        return cls(tuple(groups), torch.tensor(order, device=device), lengths)

    @classmethod
    def from_mask(cls, attention_mask: Tensor) -> LengthGroups:
        """Lengths read from a right-padded ``[B, T]`` mask (one host read)."""
        return cls.from_lengths(attention_mask.sum(dim=1).tolist(), attention_mask.device)


def length_grouped_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    length_groups: LengthGroups | None = None,
    **_: object,
) -> tuple[Tensor, None]:
    """``[B, T, H, D]`` attention output for ``[B, H, T, D]`` inputs (the transformers interface).

    Without ``length_groups`` (a caller that bypasses :class:`~cogalora.model.CoGaLoRAModel`),
    falls back to masked attention: correct, not padding-invariant.
    """
    if length_groups is None:
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
        )
        return output.transpose(1, 2).contiguous(), None
    if length_groups.packed:
        return _packed_attention(query, key, value, length_groups, dropout, scaling), None
    batch, _, width, _ = query.shape
    if len(length_groups.groups) == 1 and length_groups.groups[0].length == width:
        output = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling)
        return output.transpose(1, 2).contiguous(), None
    output = query.new_zeros(batch, width, query.shape[1], query.shape[3])
    for group in length_groups.groups:
        length = group.length
        if group.rows is None:
            rows = slice(group.start, group.stop)
            q, k, v = query[rows, :, :length], key[rows, :, :length], value[rows, :, :length]
        else:
            q, k, v = (t.index_select(0, group.rows)[:, :, :length] for t in (query, key, value))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling).transpose(1, 2)
        if group.rows is None:
            output[rows, :length] = attended
        else:
            output[group.rows, :length] = attended
    return output, None


def _packed_attention(
    query: Tensor, key: Tensor, value: Tensor, length_groups: LengthGroups, dropout: float, scaling: float | None
) -> Tensor:
    """``[1, N, H, D]`` attention output for packed ``[1, H, N, D]`` inputs: one call per length group,
    over the group's block of tokens viewed as ``[size, H, length, D]``."""
    _, heads, tokens, head_dim = query.shape
    output = query.new_empty(1, tokens, heads, head_dim)
    start = 0
    for group in length_groups.groups:
        stop = start + group.size * group.length
        shape = (group.size, group.length)
        q, k, v = (t[0, :, start:stop].unflatten(1, shape).transpose(0, 1) for t in (query, key, value))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        output[0, start:stop] = attended.transpose(1, 2).flatten(0, 1)
        start = stop
    return output


def install_length_grouped_attention(base_model: nn.Module) -> bool:
    """Switch ``base_model`` to padding-free attention; False if its architecture cannot take it.

    Only a model on the default ``sdpa`` attention is switched: one asked for ``eager`` keeps it
    (the FLOP-counting tests rely on eager's explicit products).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(base_model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(IMPLEMENTATION, length_grouped_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    try:
        base_model.set_attn_implementation(IMPLEMENTATION)
    except (AttributeError, ValueError) as error:  # an architecture without the attention interface
        del error
        return False
    return config._attn_implementation == IMPLEMENTATION
