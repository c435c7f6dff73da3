"""Analytic FLOP count of one request, as a function of its length and its gates.

Counts matrix products only (2 FLOPs per multiply-add), the convention of
``torch.utils.flop_counter.FlopCounterMode``: base encoder Linears, attention
scores and mixing, the routers (masked mean pooling as a matvec, then the MLP),
the active adapters, and the head. Elementwise work (norms, softmax,
activations) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cogalora.layer import GatedLoraLinear, SlotLinear


@dataclass(frozen=True)
class FlopBreakdown:
    total: int
    base: int
    router: int
    adapter: int
    adapter_saved: int
    """Adapter FLOPs not spent because gates were off, against all of the adapter's sites on."""

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "base": self.base,
            "router": self.router,
            "adapter": self.adapter,
            "adapter_saved": self.adapter_saved,
        }


@dataclass(frozen=True)
class FlopModel:
    """Per-token and per-example FLOP coefficients of one adapter on one base model."""

    linear_per_token: int
    attention_per_token_pair: int
    head_per_example: int
    adapter_per_token: tuple[int, ...]
    """per site: ``2 r (d_in + d_out)``, 0 where the adapter has no module."""
    pooling_per_token: int
    router_per_example: int

    @classmethod
    def for_slot(
        cls, model: nn.Module, slot: int = 0, rank: int | None = None, router_hidden: int | None = None
    ) -> FlopModel:
        """Coefficients for the adapter in ``slot`` of a :class:`~cogalora.model.CoGaLoRAModel`.

        ``rank`` / ``router_hidden`` default to the model's config; a serving model whose slots hold
        adapters of different shapes passes the adapter's own values.
        """
        hf_model = model.model
        config = hf_model.config
        linear_per_token = 0
        head = 0
        for path, module in hf_model.named_modules():
            if isinstance(module, nn.Linear):
                flops = 2 * module.in_features * module.out_features
                if ".layer." in path:
                    linear_per_token += flops
                else:
                    head += flops
            elif isinstance(module, SlotLinear):
                head += 2 * module.in_features * module.slot_out_features[slot]
        hidden = getattr(config, "hidden_size", None) or config.dim
        num_layers = getattr(config, "num_hidden_layers", None) or config.n_layers
        adapter, pooled_groups, router = [], set(), 0
        pooling = 0
        for site in model.sites:
            layer: GatedLoraLinear = model.gated_layers[site.module_path]
            if not bool(layer.slot_present[slot]):
                adapter.append(0)
                continue
            site_rank = rank or model.config.rank
            adapter.append(2 * site_rank * (site.in_features + site.out_features))
            if bool(layer.slot_routed[slot]):
                hidden_units = router_hidden or model.config.router_hidden
                router += 2 * site.in_features * hidden_units + 2 * hidden_units
                if site.input_group not in pooled_groups:
                    pooled_groups.add(site.input_group)
                    pooling += 2 * site.in_features
        return cls(
            linear_per_token=linear_per_token,
            # QK^T and attention-weighted V: 2 * T * T * hidden each, per layer.
            attention_per_token_pair=4 * hidden * num_layers,
            head_per_example=head,
            adapter_per_token=tuple(adapter),
            pooling_per_token=pooling,
            router_per_example=router,
        )

    def request(self, tokens: int, gates: list[bool]) -> FlopBreakdown:
        """FLOPs of one request of ``tokens`` tokens whose site gates are ``gates``."""
        base = tokens * self.linear_per_token + tokens * tokens * self.attention_per_token_pair + self.head_per_example
        router = tokens * self.pooling_per_token + self.router_per_example
        active = sum(flops for flops, on in zip(self.adapter_per_token, gates, strict=True) if on)
        all_on = sum(self.adapter_per_token)
        adapter = tokens * active
        return FlopBreakdown(
            total=base + router + adapter,
            base=base,
            router=router,
            adapter=adapter,
            adapter_saved=tokens * all_on - adapter,
        )
