"""Plain containers for one adapter's tensors, independent of files and of slots."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from cogalora.variants import PLAIN, AdapterVariant


@dataclass
class RouterWeights:
    """One module's router: ``sigmoid(w2 . relu(w1 @ norm(pooled) + b1) + b2)``."""

    w1: Tensor  # [hidden, d_in]
    b1: Tensor  # [hidden]
    w2: Tensor  # [hidden]
    b2: Tensor  # [1]
    input_norm: str = "none"
    """How ``pooled`` is normalised before ``w1`` (``cogalora.bank.ROUTER_INPUT_NORMS``); per adapter."""
    heads: dict[str, Tensor] = field(default_factory=dict)
    """The variant's extra heads by part name (``AdapterVariant.heads``), e.g. RAD-LoRA's ``rank_w``, ``rank_b``."""

    def parts(self) -> dict[str, Tensor]:
        """Every tensor by the part name a checkpoint gives it (``<module>.router.<part>``)."""
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2, **self.heads}


@dataclass
class AdapterWeights:
    """Everything an adapter adds to the shared base model.

    Keys are module paths in the Hugging Face model (``bert.encoder.layer.0.attention.self.query``).
    A site missing from ``lora`` has no adapter (pruned, or dropped by the freezing trick).
    """

    scaling: float
    """``alpha / r``: what ``B A x`` is multiplied by, at every site not listed in ``site_scaling``."""
    site_scaling: dict[str, float] = field(default_factory=dict)
    """module path -> its own scaling, where it differs from ``scaling`` (PEFT's ``rank_pattern`` /
    ``alpha_pattern`` give sites their own rank or alpha; rsLoRA scales by ``alpha / sqrt(r)``)."""
    variant: AdapterVariant = PLAIN
    """What its routers add to plain gated LoRA (``cogalora.variants``); every router has its heads."""
    lora: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """module path -> (A ``[r, d_in]``, B ``[d_out, r]``)"""
    routers: dict[str, RouterWeights] = field(default_factory=dict)
    """module path -> router; empty for plain LoRA and (folded) GaLoRA"""
    head: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """head Linear path -> (weight, bias)"""

    def scaling_at(self, path: str) -> float:
        """The scaling of the adapter at module ``path``."""
        return self.site_scaling.get(path, self.scaling)
