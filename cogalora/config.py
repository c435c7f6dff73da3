"""Configuration of a CoGaLoRA fine-tune: which method, where adapters go, how routers gate them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cogalora.bank import ROUTER_INPUT_NORMS

Method = Literal["full", "lora", "galora", "cogalora", "radlora", "hyperlora"]
METHODS: tuple[str, ...] = ("full", "lora", "galora", "cogalora", "radlora", "hyperlora")
ROUTED_METHODS: tuple[str, ...] = ("cogalora", "radlora", "hyperlora")
"""Methods whose adapters carry a per-example router."""

DEFAULT_RANK_SET: tuple[int, ...] = (0, 2, 4, 8)
"""RAD-LoRA's default rank choices (0: off); each must be at most ``rank``."""


def parse_rank_set(text: str) -> tuple[int, ...]:
    """``"0,2,4,8"`` -> ``(0, 2, 4, 8)``; raises ``ValueError`` naming the bad item."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"rank set must be comma-separated integers, e.g. '0,2,4,8'; got {text!r}") from None


def check_rank_set(rank_set: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """The rank set sorted, or ``ValueError``: distinct values in ``[0, rank]``, at least one above 0."""
    ranks = tuple(sorted(rank_set))
    if len(set(ranks)) != len(ranks) or not ranks or ranks[0] < 0 or ranks[-1] > rank or ranks[-1] < 1:
        raise ValueError(
            f"rank set must be distinct ranks in [0, {rank}] with at least one above 0, got {list(rank_set)}"
        )
    return ranks


#: Every module kind an encoder layer offers to adapters (see ``cogalora.architectures``).
ALL_MODULE_KINDS: tuple[str, ...] = (
    "attention.query",
    "attention.key",
    "attention.value",
    "attention.output",
    "ffn.up",
    "ffn.down",
)


@dataclass
class CoGaLoRAConfig:
    """How a model is fine-tuned and gated.

    The same object describes training (``training/``) and serving (``service/``), and is
    persisted in a checkpoint's ``cogalora.json``.
    """

    method: Method = "cogalora"
    """``full``: every weight trains, no adapters. ``lora``: plain LoRA, every adapter always on.
    ``galora``: static GaLoRA, one learnable scalar gate per module with an L1 penalty; modules whose
    ``|gate| < galora_prune_eps`` are pruned after training. ``cogalora``: a per-example router per module.
    ``radlora``: ``cogalora`` whose router also picks, per example, a rank from ``rank_set`` (nested:
    rank k uses the first k rows of ``A`` and the first k columns of ``B``). ``hyperlora``: ``cogalora``
    whose router also generates, per example, a scale for each of the adapter's rank components:
    ``B diag(s(x)) A`` with ``s(x) = W_s pool(x) + b_s`` (the smallest hypernetwork variant)."""

    rank: int = 8
    """LoRA rank r: ``A`` is ``r x d_in``, ``B`` is ``d_out x r``."""

    alpha: float = 16.0
    """LoRA scaling numerator: the adapter output is multiplied by ``alpha / rank``."""

    dropout: float = 0.0
    """Dropout on the adapter input during training (as PEFT's ``lora_dropout``)."""

    target_modules: tuple[str, ...] = ALL_MODULE_KINDS
    """Module kinds that receive an adapter in every layer, named architecture-independently
    (``attention.query`` ... ``ffn.down``; see ``cogalora.architectures``)."""

    router_hidden: int = 4
    """Width of the router MLP ``Linear(d_in -> h) -> ReLU -> Linear(h -> 1) -> sigmoid``."""

    router_input_norm: str = "none"
    """How a router reads its mean-pooled input: ``none`` as is (the original router), ``layer_norm``
    standardised over features first (its norm no longer shrinks with sequence length)."""

    router_init_bias: float = 2.0
    """Initial bias of the router's output unit. Positive starts training with gates mostly on
    (sigmoid(2) ~ 0.88), so adapters learn before the sparsity penalty switches them off."""

    tau: float = 0.5
    """Inference threshold: a module runs for an example when its gate probability ``p > tau``."""

    sparsity_lambda: float = 0.0
    """Weight of the sparsity penalty added to the loss: ``lambda * mean_l p_l`` for ``cogalora``,
    ``lambda * mean_l |g_l|`` for ``galora``; ignored by ``full`` and ``lora``."""

    rank_set: tuple[int, ...] = DEFAULT_RANK_SET
    """``radlora``: the ranks a router may pick per example (0: off); ignored by other methods."""

    rank_lambda: float = 0.0
    """``radlora``: weight of the rank penalty ``rank_lambda * mean_l E[rank_l] / rank`` beside the gate penalty."""

    galora_prune_eps: float = 0.05
    """GaLoRA modules whose learned scalar gate has ``|g| < eps`` are removed after training."""

    head_modules: tuple[str, ...] | None = field(default=None)
    """Linear modules of the classification head trained alongside the adapters. ``None`` picks the
    architecture's default (``classifier`` for BERT)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.router_hidden < 1:
            raise ValueError(f"router_hidden must be >= 1, got {self.router_hidden}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must lie in [0, 1], got {self.tau}")
        if self.router_input_norm not in ROUTER_INPUT_NORMS:
            raise ValueError(f"router_input_norm must be one of {ROUTER_INPUT_NORMS}, got {self.router_input_norm!r}")
        if self.rank_lambda < 0:
            raise ValueError(f"rank_lambda must be >= 0, got {self.rank_lambda}")
        if self.method == "radlora":
            self.rank_set = check_rank_set(tuple(self.rank_set), self.rank)
        if self.sparsity_lambda < 0:
            raise ValueError(f"sparsity_lambda must be >= 0, got {self.sparsity_lambda}")
        unknown = [kind for kind in self.target_modules if kind not in ALL_MODULE_KINDS]
        if unknown:
            raise ValueError(f"unknown target modules {unknown}; choose from {list(ALL_MODULE_KINDS)}")
        if not self.target_modules and self.method != "full":
            raise ValueError("target_modules is empty: an adapter method needs at least one module kind")
        self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def has_adapters(self) -> bool:
        return self.method != "full"

    @property
    def has_routers(self) -> bool:
        return self.method in ROUTED_METHODS

    @property
    def routed_ranks(self) -> tuple[int, ...] | None:
        """The rank choices of a rank-routing (``radlora``) adapter; ``None`` for every other method."""
        return self.rank_set if self.method == "radlora" else None

    @property
    def generated_scales(self) -> bool:
        """Whether routers generate per-example scales of the rank components (``hyperlora``)."""
        return self.method == "hyperlora"
