"""Analytic FLOP count of one request, as a function of its length and its gates.

Counts matrix products only (2 FLOPs per multiply-add), the convention of
``torch.utils.flop_counter.FlopCounterMode``: base encoder Linears, attention
scores and mixing, the routers (mean pooling as a matvec, then the MLP and the
heads of the adapter's variant, e.g. RAD-LoRA's rank head), the active adapters at
the rank each one used (with what the variant spends once per active example, e.g.
HyperLoRA's scale generation, counted as adapter work since it runs only where the
gate is on), and the head. Elementwise work (norms, softmax, activations) is not counted.

Routers, pooling and the per-adapter output head run as per-row multiply-and-sums (so that a row's
numbers do not depend on its batch), which torch's counter does not see: ``router`` and
``FlopModel.head_output_per_example`` are what to leave out when comparing with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cogalora.architectures import Site
    from cogalora.model import CoGaLoRAModel


def adapter_flops_per_token(site: Site, rank: int) -> int:
    """FLOPs per token of a rank-``rank`` adapter at ``site``: ``x A^T`` then ``(.) B^T``, ``2 r (d_in + d_out)``."""
    return 2 * rank * (site.in_features + site.out_features)


@dataclass(frozen=True)
class FlopBreakdown:
    total: int
    base: int
    router: int
    adapter: int
    adapter_saved: int
    """Adapter FLOPs not spent because gates were off, against all of the adapter's sites on."""


@dataclass(frozen=True)
class FlopModel:
    """Per-token and per-example FLOP coefficients of one adapter on one base model."""

    linear_per_token: int
    attention_per_token_pair: int
    head_per_example: int
    adapter_per_token: tuple[int, ...]
    """per site: ``2 r (d_in + d_out)``, 0 where the adapter has no module."""
    adapter_per_token_rank: tuple[int, ...]
    """per site: ``2 (d_in + d_out)``, the cost of one rank per token (0 where no module)."""
    pooling_per_token: int
    router_per_example: int
    adapter_per_example: tuple[int, ...] = ()
    """per site: FLOPs an active adapter spends once per example besides its products
    (``AdapterVariant.active_flops_per_example``); empty when no site has any."""
    head_output_per_example: int = 0
    """The part of ``head_per_example`` spent in the adapter's own output layer (``2 d labels``)."""
    pooler_adapter_per_example: int = 0
    """FLOPs of the adapter's always-on LoRA at the pooler (``2 r (d_in + d_out)`` per example; plain LoRA
    adapters trained on every Linear), counted as adapter work that no gate saves."""

    @classmethod
    def for_slot(cls, model: CoGaLoRAModel, slot: int = 0) -> FlopModel:
        """Coefficients for the adapter in ``slot`` of a :class:`~cogalora.model.CoGaLoRAModel`.

        Each site counts the adapter's own rank there and its own router width, so a serving model
        whose slots hold adapters of different shapes gets each adapter's true cost.
        """
        config = model.model.config
        hidden = getattr(config, "hidden_size", None) or config.dim
        num_layers = getattr(config, "num_hidden_layers", None) or config.n_layers
        per_token, per_example, per_label = model.linear_flops
        labels = model.output_head.slot_out_features.get(slot, 0)
        router_hidden = model.router_hidden(slot)
        adapter, per_rank, per_example_adapter, pooled_groups, router, pooling = [], [], [], set(), 0, 0
        sites = zip(
            model.sites, model.site_ranks(slot), model.site_routed(slot), model.site_variants(slot), strict=True
        )
        for site, rank, routed, variant in sites:
            adapter.append(adapter_flops_per_token(site, rank))
            per_example_adapter.append(variant.active_flops_per_example(site.in_features, rank))
            per_rank.append(adapter_flops_per_token(site, 1) if rank else 0)
            if routed:
                router += 2 * site.in_features * router_hidden + 2 * router_hidden + variant.router_flops(router_hidden)
                if site.input_group not in pooled_groups:
                    pooled_groups.add(site.input_group)
                    pooling += 2 * site.in_features
        pooler = sum(
            2 * layer.rank_of(slot) * (layer.base.in_features + layer.base.out_features)
            for layer in model.pooler_layers.values()
        )
        return cls(
            linear_per_token=per_token,
            # QK^T and attention-weighted V: 2 * T * T * hidden each, per layer.
            attention_per_token_pair=4 * hidden * num_layers,
            head_per_example=per_example + per_label * labels,
            adapter_per_token=tuple(adapter),
            adapter_per_token_rank=tuple(per_rank),
            pooling_per_token=pooling,
            router_per_example=router,
            adapter_per_example=tuple(per_example_adapter) if any(per_example_adapter) else (),
            head_output_per_example=per_label * labels,
            pooler_adapter_per_example=pooler,
        )

    def request(
        self, tokens: int, gates: list[bool], routers: bool = True, ranks: list[int] | None = None
    ) -> FlopBreakdown:
        """FLOPs of one request of ``tokens`` tokens whose site gates are ``gates``.

        ``routers=False``: gates were forced (all on or all off), so no router ran. ``ranks``: the
        rank each site used (RAD-LoRA); default, every active site at the adapter's rank there.
        """
        base = tokens * self.linear_per_token + tokens * tokens * self.attention_per_token_pair + self.head_per_example
        router = tokens * self.pooling_per_token + self.router_per_example if routers else 0
        if ranks is None:
            active = sum(flops for flops, on in zip(self.adapter_per_token, gates, strict=True) if on)
        else:
            active = sum(
                flops * rank for flops, rank, on in zip(self.adapter_per_token_rank, ranks, gates, strict=True) if on
            )
        all_on = tokens * sum(self.adapter_per_token)
        adapter = tokens * active + self.pooler_adapter_per_example
        all_on += self.pooler_adapter_per_example
        if self.adapter_per_example:
            all_on += sum(self.adapter_per_example)
            adapter += sum(flops for flops, on in zip(self.adapter_per_example, gates, strict=True) if on)
        return FlopBreakdown(
            total=base + router + adapter,
            base=base,
            router=router,
            adapter=adapter,
            adapter_saved=all_on - adapter,
        )
