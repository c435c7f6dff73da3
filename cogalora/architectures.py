"""Where adapters go in each supported encoder family, under architecture-independent names.

A *site* is one Linear module that can carry an adapter. Sites are named
``layer.<i>.<kind>`` (for example ``layer.0.attention.query``) whatever the
family calls the module, so metrics, API responses and configs read the same
for BERT, RoBERTa and DistilBERT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

#: Every module kind an encoder layer offers to adapters, in site order within a layer.
ALL_MODULE_KINDS: tuple[str, ...] = (
    "attention.query",
    "attention.key",
    "attention.value",
    "attention.output",
    "ffn.up",
    "ffn.down",
)


@dataclass(frozen=True)
class LayerRecipe:
    """What one encoder layer computes besides its Linear sites, by module path inside the layer.

    Every supported family computes ``x = norm1(out(attention(q(x), k(x), v(x))) + x)`` then
    ``x = norm2(down(act(up(x))) + x)``; these name the modules that the lean eval forward
    (``cogalora.lean_layer``) calls in place of the family's own module tree.
    """

    self_attention: str
    """The attention module: its ``attention_head_size`` and ``scaling`` shape the heads."""
    attention_norm: str
    activation: str
    output_norm: str


@dataclass(frozen=True)
class ClassifierRecipe:
    """What a sequence classifier of the family computes around its encoder layers, by module path in the
    classifier: ``embeddings`` on the token ids (and the token types, where ``token_types``), the encoder
    layers, then the head. ``head`` says how the head reads the last hidden states ``h``:

    - ``"pooler"``: ``classifier(pooler(h))`` (BERT);
    - ``"sequence"``: ``classifier(h)``, the head module taking the first token itself (RoBERTa);
    - ``"first_token"``: ``classifier(relu(pre_classifier(h[:, 0])))`` (DistilBERT).

    The family's dropout modules between them are left out: the lean forward runs in eval only, where they
    return their input. (``cogalora.lean_layer`` calls these in place of the family's model-level forward.)
    """

    embeddings: str
    head: Literal["pooler", "sequence", "first_token"]
    pooler: str | None = None
    token_types: bool = True


@dataclass(frozen=True)
class Architecture:
    """Module naming of one encoder family."""

    kinds: dict[str, str]
    """Module kind (each of ``ALL_MODULE_KINDS``) -> regex on the module path, with the layer index as group 1."""

    head_linears: tuple[str, ...]
    """Linear modules of the sequence-classification head, in forward order."""

    peft_modules_to_save: tuple[str, ...]
    """How PEFT names the head in ``modules_to_save`` for this family."""

    layer_list: str = r"(^|\.)encoder\.layer$"
    """Regex on the module path of the ``ModuleList`` of encoder layers (where packed tokens live:
    ``cogalora.packing``)."""

    pooler_linears: tuple[str, ...] = ()
    """Regexes on the module path of Linear layers between the encoder layers and the head (BERT's
    pooler). They are not sites (no router, no gate, one vector per row), but plain LoRA adapters may
    adapt them: PEFT's ``all-linear`` and a ``"dense"`` target both reach BERT's pooler."""

    layer_recipe: LayerRecipe | None = None
    """How an encoder layer computes (``None``: eval forwards run the family's own modules)."""
    classifier_recipe: ClassifierRecipe | None = None
    """What the sequence classifier computes around its layers (``None``: eval forwards run the family's own
    model-level forward)."""


_BERT_LAYER = LayerRecipe(
    self_attention="attention.self",
    attention_norm="attention.output.LayerNorm",
    activation="intermediate.intermediate_act_fn",
    output_norm="output.LayerNorm",
)

_BERT_LIKE = Architecture(
    kinds={
        "attention.query": r"layer\.(\d+)\.attention\.self\.query$",
        "attention.key": r"layer\.(\d+)\.attention\.self\.key$",
        "attention.value": r"layer\.(\d+)\.attention\.self\.value$",
        "attention.output": r"layer\.(\d+)\.attention\.output\.dense$",
        "ffn.up": r"layer\.(\d+)\.intermediate\.dense$",
        "ffn.down": r"layer\.(\d+)\.output\.dense$",
    },
    head_linears=("classifier",),
    peft_modules_to_save=("classifier",),
    pooler_linears=(r"(^|\.)pooler\.dense$",),
    layer_recipe=_BERT_LAYER,
    classifier_recipe=ClassifierRecipe(embeddings="bert.embeddings", head="pooler", pooler="bert.pooler"),
)

_ROBERTA_LIKE = Architecture(
    kinds=_BERT_LIKE.kinds,
    head_linears=("classifier.dense", "classifier.out_proj"),
    peft_modules_to_save=("classifier",),
    layer_recipe=_BERT_LAYER,
    classifier_recipe=ClassifierRecipe(embeddings="roberta.embeddings", head="sequence"),
)

_DISTILBERT = Architecture(
    kinds={
        "attention.query": r"layer\.(\d+)\.attention\.q_lin$",
        "attention.key": r"layer\.(\d+)\.attention\.k_lin$",
        "attention.value": r"layer\.(\d+)\.attention\.v_lin$",
        "attention.output": r"layer\.(\d+)\.attention\.out_lin$",
        "ffn.up": r"layer\.(\d+)\.ffn\.lin1$",
        "ffn.down": r"layer\.(\d+)\.ffn\.lin2$",
    },
    head_linears=("pre_classifier", "classifier"),
    peft_modules_to_save=("pre_classifier", "classifier"),
    layer_list=r"(^|\.)transformer\.layer$",
    layer_recipe=LayerRecipe(
        self_attention="attention",
        attention_norm="sa_layer_norm",
        activation="ffn.activation",
        output_norm="output_layer_norm",
    ),
    classifier_recipe=ClassifierRecipe(embeddings="distilbert.embeddings", head="first_token", token_types=False),
)

ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT_LIKE,
    "roberta": _ROBERTA_LIKE,
    "xlm-roberta": _ROBERTA_LIKE,
    "distilbert": _DISTILBERT,
}

#: Sites of one layer that read the same tensor: their routers share one pooling.
_SHARED_INPUT_KINDS = ("attention.query", "attention.key", "attention.value")


@dataclass(frozen=True)
class Site:
    """One adapter site of an encoder."""

    index: int
    module_path: str
    """Path in the Hugging Face model, e.g. ``bert.encoder.layer.0.attention.self.query``."""
    layer: int
    kind: str
    in_features: int
    out_features: int

    @property
    def name(self) -> str:
        return site_name(self.layer, self.kind)

    @property
    def input_group(self) -> str:
        """Sites in one group receive the same input tensor (pooled once)."""
        if self.kind in _SHARED_INPUT_KINDS:
            return f"layer.{self.layer}.attention.input"
        return self.name


def site_name(layer: int, kind: str) -> str:
    """The name of a site, e.g. ``layer.0.attention.query`` (checkpoints, results and metrics use it)."""
    return f"layer.{layer}.{kind}"


def parse_site_name(name: str) -> tuple[int, str]:
    """``layer.0.attention.query`` -> ``(0, "attention.query")``; ``ValueError`` for anything else."""
    prefix, layer, kind = [*name.split(".", 2), "", ""][:3]
    if prefix != "layer" or not layer.isdigit() or kind not in ALL_MODULE_KINDS:
        raise ValueError(f"not a site name: {name!r} (expected layer.<index>.<kind>, kind one of {ALL_MODULE_KINDS})")
    return int(layer), kind


def site_order(name: str) -> tuple[int, int]:
    """Sort key of a site name: the position of its site in every encoder (layer, then kind)."""
    layer, kind = parse_site_name(name)
    return layer, ALL_MODULE_KINDS.index(kind)


def site_names(num_layers: int, kinds: tuple[str, ...] | list[str] = ALL_MODULE_KINDS) -> list[str]:
    """The sites of an encoder of ``num_layers`` layers with adapters on ``kinds``, in site order (the
    order of :func:`find_sites`: layer by layer, kinds in the order of ``ALL_MODULE_KINDS``)."""
    ordered = [kind for kind in ALL_MODULE_KINDS if kind in kinds]
    return [site_name(layer, kind) for layer in range(num_layers) for kind in ordered]


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model type {model_type!r} is not supported by CoGaLoRA; supported model types: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def find_pooler_linears(model: nn.Module) -> list[str]:
    """Module paths of the Linear layers matching the architecture's ``pooler_linears``."""
    patterns = [re.compile(pattern) for pattern in architecture_of(model).pooler_linears]
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(pattern.search(path) for pattern in patterns)
    ]


def find_encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder layers of ``model``, in order (empty if its layout does not match the architecture's)."""
    pattern = re.compile(architecture_of(model).layer_list)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and pattern.search(path):
            return list(module)
    return []


def modules_by_kind(
    model: nn.Module, kinds: tuple[str, ...] = ALL_MODULE_KINDS
) -> list[tuple[int, str, str, nn.Module]]:
    """``(layer, kind, path, module)`` of every module whose path names one of ``kinds``, ordered by
    layer, then by kind as in ``ALL_MODULE_KINDS`` (whatever the module is now: a Linear, or a layer
    that wraps one)."""
    arch = architecture_of(model)
    patterns = {kind: re.compile(arch.kinds[kind]) for kind in ALL_MODULE_KINDS if kind in kinds}
    found = []
    for path, module in model.named_modules():
        for kind, pattern in patterns.items():
            match = pattern.search(path)
            if match:
                found.append((int(match.group(1)), kind, path, module))
    found.sort(key=lambda item: (item[0], ALL_MODULE_KINDS.index(item[1])))
    return found


def find_sites(model: nn.Module, kinds: tuple[str, ...]) -> list[Site]:
    """Locate the Linear modules of the requested kinds, ordered by layer, then by kind as in ``ALL_MODULE_KINDS``."""
    found = [item for item in modules_by_kind(model, kinds) if isinstance(item[3], nn.Linear)]
    if not found:
        raise ValueError(
            f"no target modules {list(kinds)} found in model type "
            f"{model.config.model_type!r}: its module names do not match the expected layout"
        )
    return [
        Site(
            index=i,
            module_path=path,
            layer=layer,
            kind=kind,
            in_features=module.in_features,
            out_features=module.out_features,
        )
        for i, (layer, kind, path, module) in enumerate(found)
    ]
