"""Stacked storage for many adapters at one site: one bank per LoRA rank, rows reused after release.

The lifecycle follows vLLM's LoRA layers: a bank *creates* zero-filled stacked tensors, rows are
*written* and *released*. Capacity grows by doubling, so loading N adapters costs O(N) copies in
all, and a site stores only the adapters that really have an adapter there, each at its own rank.

Routers are kept in float32 whatever the model's dtype: their input is only ``[batch, d_in]``, and
gate decisions should not move when the encoder runs in half precision.

An un-routed adapter (plain LoRA, folded GaLoRA) gets router weights of zero and an output bias of
``+inf``: its gate logit is ``+inf`` (probability 1, always on) without any special case in the
forward pass.

How a router reads its pooled input is a property of the adapter, stored per bank row
(``ROUTER_INPUT_NORMS``): ``none`` reads the masked mean as it is (the original router), ``layer_norm``
standardises it first (zero mean, unit variance over features, no affine: ``w1`` learns the scale),
which removes the shrinking of the mean's norm with sequence length. Rows of different adapters in
one mixed batch each get their own adapter's choice.

What a method adds to the plain adapter (RAD-LoRA's rank head, HyperLoRA's scale generator) is the
bank's *variant* (``cogalora.variants``): every adapter of a bank has the same one, and its heads are
stored here beside the gate router, row by row like it.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cogalora import int8_kernels
from cogalora.int8 import QuantizedRows, dequantize, int_matmul, quantize_rows, quantize_weight
from cogalora.rowwise import row_dot, row_matvec, rows_of
from cogalora.variants import PLAIN, AdapterVariant
from cogalora.weights import RouterWeights

ALWAYS_ON_LOGIT = float("inf")
RouterInputNorm = Literal["none", "layer_norm"]
ROUTER_INPUT_NORMS: tuple[str, ...] = get_args(RouterInputNorm)


def _grown(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A zero tensor of ``shape`` (each dim >= the old one) holding ``tensor`` in its leading corner."""
    grown = tensor.new_zeros(shape)
    grown[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return grown


class AdapterBank(nn.Module):
    """The adapters of one rank at one site: ``A [cap, r, d_in]``, ``B [cap, d_out, r]`` and their routers.

    ``fold_scaling``: serving banks store ``B * alpha / r`` so the forward pass never multiplies by a
    per-row scale. A training bank (one adapter, ``fold_scaling=False``) keeps ``B`` as PEFT does,
    since folding would change the optimiser's effective learning rate for ``B``; its
    ``output_scale`` is the adapter's ``alpha / r``.
    """

    GATE_ROUTER: tuple[str, ...] = ("router_w1", "router_b1", "router_w2", "router_b2")
    """The gate router's weights, per row: ``sigmoid(w2 . relu(w1 @ norm(pooled) + b1) + b2)``."""
    INTEGER_BUFFERS: tuple[str, ...] = ("codes_A", "scale_A", "sum_A", "codes_B", "scale_B")
    """int8 codes of ``A`` (per rank component) and ``B`` (per output channel), with their scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        router_hidden: int,
        *,
        variant: AdapterVariant = PLAIN,
        capacity: int = 1,
        fold_scaling: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.variant = variant
        """What every adapter here adds to plain gated LoRA (``cogalora.variants``)."""
        self.fold_scaling = fold_scaling
        self.output_scale = 1.0
        """Host factor applied to ``B A x`` (1 when the scaling is folded into ``B``)."""
        for name, shape in self._shapes(capacity, router_hidden).items():
            dtype_ = torch.float32 if name.startswith("router_") else dtype
            setattr(self, name, nn.Parameter(torch.zeros(shape, device=device, dtype=dtype_), requires_grad=False))
        variant.attach(self)
        #: ``[cap]`` bool: rows whose router standardises its input (``layer_norm``); a buffer so that
        #: it follows the bank to its device, mirrored on the host so a one-adapter forward needs no sync.
        self.register_buffer("router_norm", torch.zeros(capacity, dtype=torch.bool, device=device), persistent=False)
        self._normalised_rows: set[int] = set()
        self._free = list(range(capacity - 1, -1, -1))
        self.integer = False
        """Whether every row also keeps int8 codes of ``A`` and ``B`` for exact products (:meth:`add_delta_exact`)."""

    def _shapes(self, capacity: int, router_hidden: int) -> dict[str, tuple[int, ...]]:
        """Every per-row tensor and its shape: the adapter, the gate router, the variant's heads."""
        shapes = {
            "lora_A": (capacity, self.rank, self.in_features),
            "lora_B": (capacity, self.out_features, self.rank),
            "router_w1": (capacity, router_hidden, self.in_features),
            "router_b1": (capacity, router_hidden),
            "router_w2": (capacity, router_hidden),
            "router_b2": (capacity,),
        }
        for part, shape in self.variant.heads(self.in_features, self.rank, router_hidden).items():
            shapes[f"router_{part}"] = (capacity, *shape)
        return shapes

    @property
    def router_parameters(self) -> tuple[str, ...]:
        """The router weights (gate router and heads): trained with the router learning rate, kept in float32."""
        return (*self.GATE_ROUTER, *self.head_parameters)

    @property
    def head_parameters(self) -> tuple[str, ...]:
        """The variant's heads (``router_<part>``)."""
        return tuple(f"router_{part}" for part in self.variant.heads(self.in_features, self.rank, 1))

    # ---- capacity -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.lora_A.shape[0]

    @property
    def router_hidden(self) -> int:
        return self.router_w1.shape[1]

    @property
    def rows_used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self) -> int:
        """A free row (zero-filled), growing the bank by doubling when it is full."""
        if not self._free:
            self._resize(2 * self.capacity, self.router_hidden)
        return self._free.pop()

    @torch.no_grad()
    def release(self, row: int) -> None:
        """Zero ``row`` and make it available again."""
        for tensor in self._tensors():
            tensor[row].zero_()
        if self.integer:
            self._quantize_row(row)
        self._set_input_norm(row, "none")
        self._free.append(row)

    @torch.no_grad()
    def _resize(self, capacity: int, router_hidden: int) -> None:
        old = self.capacity
        for name, shape in self._shapes(capacity, router_hidden).items():
            param = getattr(self, name)
            setattr(self, name, nn.Parameter(_grown(param.data, shape), requires_grad=param.requires_grad))
        self.router_norm = _grown(self.router_norm, (capacity,))
        if self.integer:
            for name in self.INTEGER_BUFFERS:
                buffer = getattr(self, name)
                setattr(self, name, _grown(buffer, (capacity, *buffer.shape[1:])))
        # New rows are handed out lowest first.
        self._free = list(range(capacity - 1, old - 1, -1)) + self._free

    def _tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in ("lora_A", "lora_B", *self.router_parameters))

    def _set_input_norm(self, row: int, input_norm: str) -> None:
        if input_norm not in ROUTER_INPUT_NORMS:
            raise ValueError(f"unknown router input normalisation {input_norm!r}; choose {list(ROUTER_INPUT_NORMS)}")
        normalised = input_norm == "layer_norm"
        self.router_norm[row] = normalised
        if normalised:
            self._normalised_rows.add(row)
        else:
            self._normalised_rows.discard(row)

    def input_norm(self, row: int) -> str:
        """The router input normalisation of ``row`` (one of ``ROUTER_INPUT_NORMS``)."""
        return "layer_norm" if row in self._normalised_rows else "none"

    @torch.no_grad()
    def use_integer_products(self) -> None:
        """From now on keep int8 codes of every row's ``A`` and ``B`` (serving in ``int8``)."""
        if self.integer:
            return
        if not self.fold_scaling or not self.variant.integer_products:
            raise ValueError(
                f"exact integer products need a serving bank (scaling folded) of a variant that has them, "
                f"not {type(self.variant).__name__}"
            )
        device = self.lora_A.device
        capacity, rank, out_features = self.capacity, self.rank, self.out_features
        self.register_buffer("codes_A", torch.zeros(capacity, rank, self.in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale_A", torch.zeros(capacity, rank, device=device))
        self.register_buffer("sum_A", torch.zeros(capacity, rank, device=device))
        # B's codes transposed ([rank, d_out] per row): the layout the up product reads, row after row.
        self.register_buffer("codes_B", torch.zeros(capacity, rank, out_features, dtype=torch.int8, device=device))
        self.register_buffer("scale_B", torch.zeros(capacity, out_features, device=device))
        self.integer = True
        for row in range(capacity):
            self._quantize_row(row)

    def _quantize_row(self, row: int) -> None:
        self.codes_A[row], self.scale_A[row], self.sum_A[row] = quantize_weight(self.lora_A[row])
        codes_B, self.scale_B[row], _ = quantize_weight(self.lora_B[row])
        self.codes_B[row] = codes_B.t()

    # ---- rows ---------------------------------------------------------------------------------

    @torch.no_grad()
    def write(self, row: int, lora_A: Tensor, lora_B: Tensor, scaling: float, router: RouterWeights | None) -> None:
        """Store one adapter in ``row``; shapes were validated by the caller."""
        if router is not None and router.w1.shape[0] > self.router_hidden:
            self._resize(self.capacity, router.w1.shape[0])
        if self.fold_scaling:
            lora_B = lora_B * scaling
        else:
            self.output_scale = float(scaling)
        self.lora_A[row].copy_(lora_A)
        self.lora_B[row].copy_(lora_B)
        if self.integer:
            self._quantize_row(row)
        for name in self.router_parameters:
            getattr(self, name)[row].zero_()
        self._set_input_norm(row, "none" if router is None else router.input_norm)
        if router is None:
            self.router_b2[row] = ALWAYS_ON_LOGIT
            return
        for part, tensor in router.parts().items():
            tensor = tensor.reshape(()) if part == "b2" else tensor
            # A router narrower than the bank's fills the leading corner; the rest stays zero.
            getattr(self, f"router_{part}")[row][tuple(slice(0, n) for n in tensor.shape)] = tensor

    def read(self, row: int, scaling: float) -> tuple[Tensor, Tensor, RouterWeights | None]:
        """``(A, B, router)`` of ``row`` with ``B`` unscaled, as a checkpoint stores them."""
        lora_B = self.lora_B[row].detach().clone()
        if self.fold_scaling:
            lora_B = lora_B / scaling
        router = None
        if self.router_b2[row].item() != ALWAYS_ON_LOGIT:
            router = RouterWeights(
                w1=self.router_w1[row].detach().clone(),
                b1=self.router_b1[row].detach().clone(),
                w2=self.router_w2[row].detach().clone(),
                b2=self.router_b2[row].detach().reshape(1).clone(),
                input_norm=self.input_norm(row),
                heads={
                    name.removeprefix("router_"): getattr(self, name)[row].detach().clone()
                    for name in self.head_parameters
                },
            )
        return self.lora_A[row].detach().clone(), lora_B, router

    @torch.no_grad()
    def init_for_training(
        self, row: int, scaling: float, routed: bool, router_init_bias: float, router_input_norm: str = "none"
    ) -> None:
        """A fresh adapter as PEFT initialises it (A Kaiming-uniform, B zero): the model starts as the base."""
        for tensor in self._tensors():
            tensor[row].zero_()
        self._set_input_norm(row, router_input_norm if routed else "none")
        nn.init.kaiming_uniform_(self.lora_A[row], a=5**0.5)
        self.output_scale = 1.0 if self.fold_scaling else float(scaling)
        if not routed:
            self.router_b2[row] = ALWAYS_ON_LOGIT
            return
        bound = 1.0 / self.in_features**0.5
        self.router_w1[row].uniform_(-bound, bound)
        self.router_w2[row].uniform_(-0.5, 0.5)
        self.router_b2[row] = router_init_bias
        self.variant.init_row(self, row, router_init_bias)

    # ---- forward pieces -----------------------------------------------------------------------

    def router_logits(self, pooled: Tensor, rows: int | Tensor) -> Tensor:
        """Gate logit of each row of ``pooled`` ([B, d_in], float32) under its own adapter's router.

        ``rows``: one bank row for every batch row, or a ``[B]`` tensor of bank rows (``cogalora.rowwise``).
        """
        return self.gate(pooled, rows)[0]

    def gate(self, pooled: Tensor, rows: int | Tensor) -> tuple[Tensor, Tensor]:
        """``(gate logits [B], the router's hidden layer [B, h])``, each row on its own (``cogalora.rowwise``)."""
        pooled = self.router_input(pooled, rows)
        hidden = torch.relu(row_matvec(pooled, rows_of(self.router_w1, rows)) + rows_of(self.router_b1, rows))
        return row_dot(hidden, rows_of(self.router_w2, rows)) + rows_of(self.router_b2, rows), hidden

    def route(self, pooled: Tensor, rows: int | Tensor) -> tuple[Tensor, Tensor | None]:
        """Eval: ``(gate logits [B], the rank each row uses [B] or None for the bank's rank)``."""
        logits, hidden = self.gate(pooled, rows)
        return logits, self.variant.ranks(self, hidden, rows)

    def router_input(self, pooled: Tensor, rows: int | Tensor) -> Tensor:
        """``pooled``, standardised for the rows whose adapter asks for it (each row on its own)."""
        if not self._normalised_rows:
            return pooled
        normalised = F.layer_norm(pooled, pooled.shape[-1:])
        if isinstance(rows, int):
            return normalised if rows in self._normalised_rows else pooled
        return torch.where(self.router_norm.index_select(0, rows).unsqueeze(1), normalised, pooled)

    def delta(self, x: Tensor, rows: int | Tensor, weights: Tensor | None = None) -> Tensor:
        """``B diag(w) A x`` (scaling folded or not, see ``output_scale``) for ``x`` ([n, T, d_in]).

        ``rows``: one bank row for all of ``x`` (two plain products), or ``[n]`` bank rows, one per
        row of ``x`` (two batched products over per-row gathered ``A`` and ``B``: BGMV-style).
        ``weights`` ([n, rank]): per-row weights on ``A x``'s components (a variant's training choice,
        ``cogalora.variants``); ``None``: all ones.
        """
        if isinstance(rows, int):
            down = F.linear(x, self.lora_A[rows])
            if weights is not None:
                down = down * weights[:, None, :].to(down.dtype)
            return F.linear(down, self.lora_B[rows])
        down = torch.bmm(x, self.lora_A.index_select(0, rows).transpose(1, 2))
        if weights is not None:
            down = down * weights[:, None, :].to(down.dtype)
        return torch.bmm(down, self.lora_B.index_select(0, rows).transpose(1, 2))

    def add_delta(
        self,
        out: Tensor,
        x: Tensor,
        rows: int | Tensor,
        alpha: float,
        rank: int | None = None,
        scales: Tensor | None = None,
    ) -> None:
        """``out += alpha * B A x`` in place, for ``x`` and ``out`` of the same rows ([n, T, *]).

        ``rank``: use the first ``rank`` rows of ``A`` and columns of ``B`` (nested ranks); the products
        are that much smaller. Default: the bank's rank. ``scales`` ([n, rank]): ``out += alpha * B diag(s) A x``
        with each row's own ``s`` (a variant's component scales).

        The up-projection accumulates straight into ``out`` (one fused product, no ``[n, T, d_out]``
        temporary): at rank 8 the adapter's cost is mostly memory traffic over that tensor. The
        ``out=`` form (rather than ``addmm_``) keeps the product visible to torch's FLOP counter.
        """
        lora_A, lora_B = self.lora_A, self.lora_B
        if rank is not None and rank != self.rank:
            lora_A, lora_B = lora_A[:, :rank], lora_B[:, :, :rank]
        if scales is not None:
            scales = scales[:, : lora_A.shape[1]].to(x.dtype)
        if isinstance(rows, int):
            down = torch.mm(x.reshape(-1, self.in_features), lora_A[rows].t())
            if scales is not None:
                down = (down.view(x.shape[0], x.shape[1], -1) * scales[:, None, :]).view(down.shape)
            flat = out.view(-1, self.out_features)
            torch.addmm(flat, down, lora_B[rows].t(), alpha=alpha, out=flat)
            return
        down = torch.bmm(x, lora_A.index_select(0, rows).transpose(1, 2))
        if scales is not None:
            down = down * scales[:, None, :]
        torch.baddbmm(out, down, lora_B.index_select(0, rows).transpose(1, 2), alpha=alpha, out=out)

    def add_delta_exact(
        self, out: Tensor, x: QuantizedRows, row: int, rank: int | None = None, tokens: Tensor | None = None
    ) -> None:
        """``out += B A x`` for the token rows of ``x`` (``[n, d_in]`` int8 codes) and ``out`` (``[n, d_out]``).

        Both products are exact integer sums (``A x`` is quantized per token again before ``B``), so a
        token's update is the same bits whatever other rows run beside it. Serving banks fold
        ``alpha / r`` into ``B``, so nothing else multiplies it. ``rank``: nested rank. ``tokens`` ([t],
        int64): update only those token rows (the others' gates are off).

        On the CPU the whole step is one compiled call where it was built (``int8_kernels.add_delta``,
        the same bits); else the torch operations below.
        """
        rank = self.rank if rank is None else rank
        if int8_kernels.add_delta(out, tuple(x), self._integer_buffers(), row, rank, tokens):
            return
        if tokens is not None:
            update = out.new_zeros(tokens.shape[0], out.shape[-1])
            self.add_delta_exact(update, x.select(tokens), row, rank)
            out.index_add_(0, tokens, update)
            return
        codes_A, scale_A, sum_A = self.codes_A[row, :rank], self.scale_A[row, :rank], self.sum_A[row, :rank]
        down = quantize_rows(dequantize(int_matmul(x.values, codes_A.t()), x, scale_A, sum_A, None))
        codes_B, scale_B = self.codes_B[row, :rank], self.scale_B[row]
        sum_B = codes_B.sum(dim=0, dtype=torch.int32).float().mul_(scale_B)
        out.add_(dequantize(int_matmul(down.values, codes_B), down, scale_B, sum_B, None))

    def add_delta_exact_per_token(
        self, out: Tensor, x: QuantizedRows, token_rows: Tensor, tokens: Tensor | None, rank: int | None = None
    ) -> bool:
        """:meth:`add_delta_exact` for tokens of several adapters, each with its own (``token_rows``, one
        bank row per updated token), as one compiled call; False where that call does not apply, and then
        the caller stacks the products instead (:meth:`add_delta_exact_stacked`, the same bits)."""
        rank = self.rank if rank is None else rank
        return int8_kernels.add_delta(out, tuple(x), self._integer_buffers(), token_rows, rank, tokens)

    def _integer_buffers(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.codes_A, self.scale_A, self.sum_A, self.codes_B, self.scale_B

    def add_delta_exact_stacked(
        self,
        out: Tensor,
        x: QuantizedRows,
        rows: Tensor,
        block_adapters: list[int],
        block_tokens: list[int],
        rank: int | None = None,
    ) -> None:
        """:meth:`add_delta_exact` for tokens of several adapters at once: one product pair in all.

        ``x`` and ``out`` hold ``n`` tokens (``[n, d]``) in blocks: block ``i`` is the next
        ``block_tokens[i]`` tokens, all of the adapter in bank row ``rows[block_adapters[i]]`` (a block is
        typically one sequence). The adapters' ``A`` codes are stacked into one ``[g * rank, d_in]`` matrix
        and each token keeps only its own block of the product; before ``B`` each token's codes are
        spread into its own block of a zero ``[n, g * rank]`` matrix, so the stacked ``B`` product adds
        only zeros from the other blocks. The int32 sums are therefore those of :meth:`add_delta_exact`,
        and so are the bits: the per-element steps around them are the same operations on the same
        values (each token is turned back into floats with its adapter's own scales, picked by
        ``weight_rows``). The stacking costs ``g`` times the (rank-sized) adapter products, and saves
        ``g - 1`` pairs of kernels.
        """
        rank = self.rank if rank is None else rank
        count, tokens, device = rows.shape[0], x.values.shape[0], rows.device
        token_adapter = torch.tensor(block_adapters, device=device).repeat_interleave(
            torch.tensor(block_tokens, device=device), output_size=tokens
        )
        columns = (token_adapter * rank).unsqueeze(1) + torch.arange(rank, device=device)  # [n, rank]
        codes_A = self.codes_A.index_select(0, rows)[:, :rank].reshape(count * rank, self.in_features)
        scale_A = self.scale_A.index_select(0, rows)[:, :rank].contiguous()  # [g, rank]
        sum_A = self.sum_A.index_select(0, rows)[:, :rank].contiguous()
        acc = int_matmul(x.values, codes_A.t()).gather(1, columns)
        down = quantize_rows(dequantize(acc, x, scale_A, sum_A, None, weight_rows=token_adapter))
        spread = torch.zeros(tokens, count * rank, dtype=torch.int8, device=device)
        spread.scatter_(1, columns, down.values)
        codes_B = self.codes_B.index_select(0, rows)[:, :rank]  # [g, rank, d_out]
        scale_B = self.scale_B.index_select(0, rows)
        sum_B = codes_B.sum(dim=1, dtype=torch.int32).float().mul_(scale_B)
        acc = int_matmul(spread, codes_B.reshape(count * rank, self.out_features))
        out.add_(dequantize(acc, down, scale_B, sum_B, None, weight_rows=token_adapter))
