"""Where each row's tokens sit in a forward: padded ``[B, T]`` or packed end to end without padding.

In a padded batch every Linear product, norm and activation of the encoder layers also runs on
the ``T - length`` padding tokens of each row: served traffic of one sentence per request padded
about a fifth of its tokens. A *packed* forward hands the encoder layers ``[1, N, d]``: the batch's
``N`` real tokens, group after group of :class:`~cogalora.attention.LengthGroups` (rows of one length
side by side), so that attention sees each group as one contiguous block. The embeddings and the
head still see the padded batch: the first encoder layer packs on entry, the last one unpacks on
exit (zeros at the padding).

Everything in an encoder layer except attention works token by token, and attention runs the same
call per length group in both layouts, so a token's numbers are those of the padded forward, bit
for bit; the tests check it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from cogalora import int8_kernels
from cogalora.attention import LengthGroups


@dataclass(frozen=True)
class TokenLayout:
    """The flat token positions (``[B * T]`` padded, or ``[N]`` packed) of each batch row's real tokens."""

    groups: LengthGroups
    width: int
    """The padded width ``T``."""
    device: torch.device

    @property
    def packed(self) -> bool:
        return self.groups.packed

    @property
    def batch_size(self) -> int:
        return len(self.groups.lengths)

    @cached_property
    def blocks(self) -> tuple[list[int], list[int]]:
        """The flat tokens as blocks of one row each, in flat order: ``(the row of each block, its token
        count)``; padded blocks are ``width`` long (padding included), packed ones the row's length."""
        if not self.packed:
            return list(range(self.batch_size)), [self.width] * self.batch_size
        order = [
            row
            for group in self.groups.groups
            for row in (range(group.start, group.stop) if group.rows is None else group.rows.tolist())
        ]
        return order, [self.groups.lengths[row] for row in order]

    @cached_property
    def row_starts(self) -> Tensor:
        """``[B]`` long: the flat position of each row's first token."""
        starts = [0] * self.batch_size
        position = 0
        for row, size in zip(*self.blocks, strict=True):
            starts[row] = position
            position += size
        return torch.tensor(starts, device=self.device)

    @cached_property
    def lengths(self) -> Tensor:
        """``[B]`` long: each row's real token count."""
        return torch.tensor(self.groups.lengths, device=self.device)

    @cached_property
    def row_of_token(self) -> Tensor:
        """``[tokens]`` long: the batch row of every flat token (padding tokens included when padded)."""
        rows = torch.arange(self.batch_size, device=self.device)
        if not self.packed:
            return rows.repeat_interleave(self.width)
        index, counts = self.tokens_of(rows)
        return torch.empty_like(index).index_copy_(0, index, rows.repeat_interleave(counts, output_size=index.shape[0]))

    def tokens_of(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """The flat positions of the real tokens of batch ``rows`` (row after row), and each row's count."""
        counts = self.lengths.index_select(0, rows)
        total = int(counts.sum())
        first = torch.cumsum(counts, 0) - counts  # where each row's tokens begin in the result
        offset = (self.row_starts.index_select(0, rows) - first).repeat_interleave(counts, output_size=total)
        return torch.arange(total, device=self.device) + offset, counts

    @cached_property
    def _real_tokens(self) -> tuple[Tensor | None, Tensor]:
        """Flat positions of every real token (``None``: all tokens are real) and the row of each."""
        if self.packed or all(length == self.width for length in self.groups.lengths):
            return None, self.row_of_token
        rows = torch.arange(self.batch_size, device=self.device)
        index, counts = self.tokens_of(rows)
        return index, rows.repeat_interleave(counts, output_size=index.shape[0])

    def row_sums(self, x: Tensor) -> Tensor:
        """``[B, d]`` float32: each row's real tokens of ``x`` (``[B, T, d]`` or packed ``[1, N, d]``) summed.

        One ``index_add_`` adds every row's tokens in token order into its own zero row: a row's sum is
        the same additions in the same order in any batch, padded or packed.
        """
        index, owners = self._real_tokens
        tokens = x.reshape(-1, x.shape[-1])
        if index is not None:
            tokens = tokens.index_select(0, index)
        return tokens.new_zeros(self.batch_size, tokens.shape[-1], dtype=torch.float32).index_add_(
            0, owners, tokens.to(torch.float32)
        )

    def row_means(self, x: Tensor) -> Tensor:
        """``[B, d]`` float32: each row's mean real token, :meth:`row_sums` divided by the row's length
        (one compiled call on the CPU where it was built, ``int8_kernels.row_means``: the same bits)."""
        index, owners = self._real_tokens
        means = int8_kernels.row_means(x.reshape(-1, x.shape[-1]), index, owners, self.lengths)
        return self.row_sums(x) / self.lengths.unsqueeze(1) if means is None else means

    @cached_property
    def padded_index(self) -> Tensor:
        """Packed only: ``[N]``, the position in the flat padded ``[B * T]`` batch of each packed token."""
        owners = self.row_of_token
        within = torch.arange(owners.shape[0], device=self.device) - self.row_starts.index_select(0, owners)
        return owners * self.width + within

    def pack(self, hidden: Tensor) -> Tensor:
        """``[B, T, d]`` padded hidden states -> ``[1, N, d]``, the real tokens in packed order."""
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.padded_index).unsqueeze(0)

    def unpack(self, packed: Tensor) -> Tensor:
        """``[1, N, d]`` -> ``[B, T, d]``, zeros at the padding."""
        flat = packed.new_zeros(self.batch_size * self.width, packed.shape[-1])
        return flat.index_copy_(0, self.padded_index, packed[0]).view(self.batch_size, self.width, -1)
