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

A *rank-routing* bank (RAD-LoRA, ``rank_set`` given) gives every router a second head on the same
hidden layer: ``rank_logits = W_r h + b_r`` over the bank's rank choices. Ranks are nested: rank
``k`` is the first ``k`` rows of ``A`` and the first ``k`` columns of ``B``, so one stored
full-rank adapter serves every choice. In eval a row's rank is the choice of the highest logit
(``argmax``; a tie goes to the first, i.e. the smallest rank).

A *generated-scale* bank (HyperLoRA, ``generated_scales=True``: the smallest honest form of the
hypernetwork variant) keeps each adapter's stored ``A`` and ``B`` and gives every router
a third output, one scale per rank component generated from the same pooled input,
``s(x) = W_s pool(x) + b_s``, so the update is ``B diag(s(x)) A``: ``A x`` is multiplied by ``s`` per
row. ``W_s`` starts at zero and ``b_s`` at one, so a fresh adapter is plain LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cogalora.int8 import QuantizedRows, dequantize, int_matmul, quantize_rows, quantize_weight
from cogalora.weights import RouterWeights

ALWAYS_ON_LOGIT = float("inf")
ROUTER_INPUT_NORMS: tuple[str, ...] = ("none", "layer_norm")


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

    ROUTER_PARAMETERS: tuple[str, ...] = (
        "router_w1",
        "router_b1",
        "router_w2",
        "router_b2",
        "router_rank_w",
        "router_rank_b",
        "router_scale_w",
        "router_scale_b",
    )
    """The router weights (every head): trained with the router learning rate, kept in float32."""
    INTEGER_BUFFERS: tuple[str, ...] = ("codes_A", "scale_A", "sum_A", "codes_B", "scale_B")
    """int8 codes of ``A`` (per rank component) and ``B`` (per output channel), with their scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        router_hidden: int,
        *,
        rank_set: tuple[int, ...] | None = None,
        generated_scales: bool = False,
        capacity: int = 1,
        fold_scaling: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.rank_set = None if rank_set is None else tuple(rank_set)
        """Rank choices of every router here (RAD-LoRA), or ``None``: every active row uses ``rank``."""
        self.generated_scales = generated_scales
        """Whether every router here also generates per-row scales of the rank components (HyperLoRA)."""
        self.fold_scaling = fold_scaling
        self.output_scale = 1.0
        """Host factor applied to ``B A x`` (1 when the scaling is folded into ``B``)."""
        weights = dict(device=device, dtype=dtype)
        router = dict(device=device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.zeros(capacity, rank, in_features, **weights), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(capacity, out_features, rank, **weights), requires_grad=False)
        self.router_w1 = nn.Parameter(torch.zeros(capacity, router_hidden, in_features, **router), requires_grad=False)
        self.router_b1 = nn.Parameter(torch.zeros(capacity, router_hidden, **router), requires_grad=False)
        self.router_w2 = nn.Parameter(torch.zeros(capacity, router_hidden, **router), requires_grad=False)
        self.router_b2 = nn.Parameter(torch.zeros(capacity, **router), requires_grad=False)
        choices = len(self.rank_set or ())
        self.router_rank_w = nn.Parameter(torch.zeros(capacity, choices, router_hidden, **router), requires_grad=False)
        self.router_rank_b = nn.Parameter(torch.zeros(capacity, choices, **router), requires_grad=False)
        scales = rank if generated_scales else 0
        self.router_scale_w = nn.Parameter(torch.zeros(capacity, scales, in_features, **router), requires_grad=False)
        self.router_scale_b = nn.Parameter(torch.zeros(capacity, scales, **router), requires_grad=False)
        #: ``[choices]`` the rank of each choice, and ``[choices, rank]`` its 0/1 mask over ``A``'s rows.
        self.register_buffer(
            "rank_choices", torch.tensor(self.rank_set or (), dtype=torch.long, device=device), persistent=False
        )
        self.register_buffer(
            "rank_masks",
            (torch.arange(rank, device=device)[None, :] < self.rank_choices[:, None]).to(torch.float32),
            persistent=False,
        )
        #: ``[cap]`` bool: rows whose router standardises its input (``layer_norm``); a buffer so that
        #: it follows the bank to its device, mirrored on the host so a one-adapter forward needs no sync.
        self.register_buffer("router_norm", torch.zeros(capacity, dtype=torch.bool, device=device), persistent=False)
        self._normalised_rows: set[int] = set()
        self._free = list(range(capacity - 1, -1, -1))
        self.integer = False
        """Whether every row also keeps int8 codes of ``A`` and ``B`` for exact products (:meth:`add_delta_exact`)."""

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
        shapes = {
            "lora_A": (capacity, self.rank, self.in_features),
            "lora_B": (capacity, self.out_features, self.rank),
            "router_w1": (capacity, router_hidden, self.in_features),
            "router_b1": (capacity, router_hidden),
            "router_w2": (capacity, router_hidden),
            "router_b2": (capacity,),
            "router_rank_w": (capacity, len(self.rank_set or ()), router_hidden),
            "router_rank_b": (capacity, len(self.rank_set or ())),
            "router_scale_w": (capacity, self.router_scale_w.shape[1], self.in_features),
            "router_scale_b": (capacity, self.router_scale_w.shape[1]),
        }
        for name, shape in shapes.items():
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
        return (
            self.lora_A,
            self.lora_B,
            self.router_w1,
            self.router_b1,
            self.router_w2,
            self.router_b2,
            self.router_rank_w,
            self.router_rank_b,
            self.router_scale_w,
            self.router_scale_b,
        )

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
        if not self.fold_scaling or self.generated_scales:
            raise ValueError("exact integer products need a serving bank (scaling folded, no generated scales)")
        device = self.lora_A.device
        capacity, rank, out_features = self.capacity, self.rank, self.out_features
        self.register_buffer("codes_A", torch.zeros(capacity, rank, self.in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale_A", torch.zeros(capacity, rank, device=device))
        self.register_buffer("sum_A", torch.zeros(capacity, rank, device=device))
        self.register_buffer("codes_B", torch.zeros(capacity, out_features, rank, dtype=torch.int8, device=device))
        self.register_buffer("scale_B", torch.zeros(capacity, out_features, device=device))
        self.integer = True
        for row in range(capacity):
            self._quantize_row(row)

    def _quantize_row(self, row: int) -> None:
        self.codes_A[row], self.scale_A[row], self.sum_A[row] = quantize_weight(self.lora_A[row])
        self.codes_B[row], self.scale_B[row], _ = quantize_weight(self.lora_B[row])

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
        for tensor in self._tensors()[2:]:
            tensor[row].zero_()
        self._set_input_norm(row, "none" if router is None else router.input_norm)
        if router is None:
            self.router_b2[row] = ALWAYS_ON_LOGIT
            return
        hidden = router.w1.shape[0]
        self.router_w1[row, :hidden] = router.w1
        self.router_b1[row, :hidden] = router.b1
        self.router_w2[row, :hidden] = router.w2
        self.router_b2[row] = router.b2.reshape(())
        if self.rank_set is not None:
            self.router_rank_w[row, :, :hidden] = router.rank_w
            self.router_rank_b[row] = router.rank_b
        if self.generated_scales:
            self.router_scale_w[row] = router.scale_w
            self.router_scale_b[row] = router.scale_b

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
            )
            if self.rank_set is not None:
                router.rank_w = self.router_rank_w[row].detach().clone()
                router.rank_b = self.router_rank_b[row].detach().clone()
            if self.generated_scales:
                router.scale_w = self.router_scale_w[row].detach().clone()
                router.scale_b = self.router_scale_b[row].detach().clone()
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
        if self.rank_set is not None:
            # Start mostly at the largest rank, as gates start mostly on: adapters learn before the
            # rank penalty makes routers pick smaller ranks.
            self.router_rank_w[row].uniform_(-0.5, 0.5)
            self.router_rank_b[row, -1] = router_init_bias
        if self.generated_scales:
            self.router_scale_b[row] = 1.0  # s(x) = 1 for every input: the adapter starts as plain LoRA

    # ---- forward pieces -----------------------------------------------------------------------

    def router_logits(self, pooled: Tensor, rows: int | Tensor) -> Tensor:
        """Gate logit of each row of ``pooled`` ([B, d_in], float32) under its own adapter's router.

        ``rows``: one bank row for every batch row, or a ``[B]`` tensor of bank rows (gathered: the
        cost does not depend on how many adapters the bank holds).
        """
        return self.router(pooled, rows)[0]

    def router(self, pooled: Tensor, rows: int | Tensor) -> tuple[Tensor, Tensor | None]:
        """``(gate logits [B], rank logits [B, choices] or None)``: both heads on one hidden layer.

        Each row is a multiply-and-sum of its own, never a matrix product over the batch, so a
        row's logits do not depend on how many rows are scored with it (gate decisions are thresholds
        on them).
        """
        pooled = self._router_input(pooled, rows)
        pick = (lambda t: t[rows]) if isinstance(rows, int) else (lambda t: t.index_select(0, rows))
        hidden = torch.relu(_row_matvec(pooled, pick(self.router_w1)) + pick(self.router_b1))
        gate = _row_dot(hidden, pick(self.router_w2)) + pick(self.router_b2)
        rank = None
        if self.rank_set is not None:
            rank = _row_matvec(hidden, pick(self.router_rank_w)) + pick(self.router_rank_b)
        return gate, rank

    def component_scales(self, pooled: Tensor, rows: int | Tensor) -> Tensor:
        """``[B, rank]`` generated scales ``s(x) = W_s norm(pooled) + b_s`` of each row (float32; HyperLoRA).

        ``pooled``: the rows' pooled site inputs ([B, d_in], float32); ``rows`` as in :meth:`router`.
        """
        pooled = self._router_input(pooled, rows)
        pick = (lambda t: t[rows]) if isinstance(rows, int) else (lambda t: t.index_select(0, rows))
        return _row_matvec(pooled, pick(self.router_scale_w)) + pick(self.router_scale_b)

    def _router_input(self, pooled: Tensor, rows: int | Tensor) -> Tensor:
        """``pooled``, standardised for the rows whose adapter asks for it (each row on its own)."""
        if not self._normalised_rows:
            return pooled
        normalised = F.layer_norm(pooled, pooled.shape[-1:])
        if isinstance(rows, int):
            return normalised if rows in self._normalised_rows else pooled
        return torch.where(self.router_norm.index_select(0, rows).unsqueeze(1), normalised, pooled)

    def delta(self, x: Tensor, rows: int | Tensor, rank_mask: Tensor | None = None) -> Tensor:
        """``B A x`` (scaling folded or not, see ``output_scale``) for ``x`` ([n, T, d_in]).

        ``rows``: one bank row for all of ``x`` (two plain products), or ``[n]`` bank rows, one per
        row of ``x`` (two batched products over per-row gathered ``A`` and ``B``: BGMV-style).
        ``rank_mask`` ([n, rank]): weights on ``A x``'s components per row: training's nested ranks (0/1
        in the forward, rank k: ones on the first k, with the rank estimator's gradient) and/or
        HyperLoRA's generated scales.
        """
        if isinstance(rows, int):
            down = F.linear(x, self.lora_A[rows])
            if rank_mask is not None:
                down = down * rank_mask[:, None, :].to(down.dtype)
            return F.linear(down, self.lora_B[rows])
        down = torch.bmm(x, self.lora_A.index_select(0, rows).transpose(1, 2))
        if rank_mask is not None:
            down = down * rank_mask[:, None, :].to(down.dtype)
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

        ``rank``: use the first ``rank`` rows of ``A`` and columns of ``B`` (nested ranks, RAD-LoRA);
        the products are that much smaller. Default: the bank's rank. ``scales`` ([n, rank], HyperLoRA):
        ``out += alpha * B diag(s) A x`` with each row's own ``s``.

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

    def add_delta_exact(self, out: Tensor, x: QuantizedRows, row: int, rank: int | None = None) -> None:
        """``out += B A x`` for the token rows of ``x`` (``[n, d_in]`` int8 codes) and ``out`` (``[n, d_out]``).

        Both products are exact integer sums (``A x`` is quantized per token again before ``B``), so a
        token's update is the same bits whatever other rows run beside it. Serving banks fold
        ``alpha / r`` into ``B``, so nothing else multiplies it. ``rank``: nested rank (RAD-LoRA).
        """
        rank = self.rank if rank is None else rank
        codes_A = self.codes_A[row, :rank]
        down = dequantize(int_matmul(x.values, codes_A.t()), x, self.scale_A[row, :rank], self.sum_A[row, :rank], None)
        down = quantize_rows(down)
        codes_B = self.codes_B[row, :, :rank]
        scale_B = self.scale_B[row]
        sum_B = codes_B.sum(dim=1, dtype=torch.int32).float().mul_(scale_B)
        out.add_(dequantize(int_matmul(down.values, codes_B.t()), down, scale_B, sum_B, None))


def _row_dot(x: Tensor, weight: Tensor) -> Tensor:
    """One output per row: ``x [B, d]`` with ``weight [d]`` (shared) or ``[B, d]`` (per row) -> ``[B]``."""
    return (x * weight).sum(-1)


def _row_matvec(x: Tensor, weight: Tensor) -> Tensor:
    """Several outputs per row: ``x [B, d]`` with ``weight [h, d]`` (shared) or ``[B, h, d]`` -> ``[B, h]``."""
    return (x.unsqueeze(1) * weight).sum(-1)
