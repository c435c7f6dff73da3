"""The eval forward of an encoder layer without the family's module tree.

A Hugging Face encoder layer reaches its seven tensor operations through about twenty module
calls, keyword plumbing and deprecation wrappers: for a one-sentence forward that Python costs more
than the arithmetic (measured on MiniLM int8, one thread: 5.3 ms per forward through the modules,
2.2 ms for the same products called directly). In eval, :class:`LeanLayers` runs each layer as
its :class:`~cogalora.architectures.LayerRecipe` says, calling the same Linear modules (sites
included), the same attention function and the same norms and activation, in the same order on the
same tensors: the numbers are those of the family's forward, bit for bit (the tests check it).
Training forwards keep the family's own code (dropout, gradient checkpointing).

Around the layers, :class:`LeanClassifier` does the same for the model-level forward: embeddings, the
layers, the head, as the family's :class:`~cogalora.architectures.ClassifierRecipe` says, without the
decorators, output records and the four-dimensional attention mask (which the length-grouped attention
never reads) of the family's forward: 6-8 % of a one-sentence int8 forward on MiniLM.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cogalora.architectures import ALL_MODULE_KINDS, Architecture, ClassifierRecipe, LayerRecipe, modules_by_kind
from cogalora.attention import LengthGroups, length_grouped_attention


@dataclass(frozen=True)
class _Parts:
    """One layer's modules, resolved: what its lean forward calls."""

    query: nn.Module
    key: nn.Module
    value: nn.Module
    output: nn.Module
    up: nn.Module
    down: nn.Module
    activation: nn.Module
    attention_norm: nn.LayerNorm
    output_norm: nn.LayerNorm
    head_size: int
    scaling: float


class LeanLayers:
    """The lean eval forward installed on each encoder layer of a model (see the module docstring)."""

    def __init__(self, layers: list[nn.Module], linear_paths: list[dict[str, str]], recipe: LayerRecipe) -> None:
        self.layers = layers
        self.linear_paths = linear_paths
        self.recipe = recipe
        self.enabled = True
        """Off: every forward runs the family's modules (for comparisons)."""
        for layer in layers:
            # Bound to the layer (a deep copy of the model binds its own copy).
            layer.forward = types.MethodType(_layer_forward, layer)
            layer._cogalora_lean = self
        self.bind()

    @classmethod
    def install(cls, model: nn.Module, architecture: Architecture, layers: list[nn.Module]) -> LeanLayers | None:
        """Lean eval forwards on ``layers`` (the encoder's, in order); None if the family has no recipe or a
        layer does not have the recipe's modules."""
        recipe = architecture.layer_recipe
        if recipe is None or not layers:
            return None
        paths = _linear_paths(model, layers)
        if paths is None:
            return None
        for layer in layers:
            for path in (recipe.self_attention, recipe.attention_norm, recipe.activation, recipe.output_norm):
                try:
                    layer.get_submodule(path)
                except AttributeError:
                    return None
        return cls(layers, paths, recipe)

    def bind(self) -> None:
        """Resolve every layer's modules again: call after replacing any of them (sites, int8 products)."""
        recipe = self.recipe
        for layer, paths in zip(self.layers, self.linear_paths, strict=True):
            attention = layer.get_submodule(recipe.self_attention)
            layer._cogalora_parts = _Parts(
                **{name: layer.get_submodule(path) for name, path in paths.items()},
                activation=layer.get_submodule(recipe.activation),
                attention_norm=layer.get_submodule(recipe.attention_norm),
                output_norm=layer.get_submodule(recipe.output_norm),
                head_size=attention.attention_head_size,
                scaling=attention.scaling,
            )


class LeanClassifier:
    """The eval forward of a whole sequence classifier around its lean layers (see the module docstring).

    The layers are called as modules, so the model's hooks on them (packing tokens before the first,
    unpacking after the last: ``cogalora.model``) run as in the family's forward.
    """

    def __init__(self, model: nn.Module, recipe: ClassifierRecipe, layers: list[nn.Module]) -> None:
        self.recipe = recipe
        self.layers = layers
        self.embeddings = model.get_submodule(recipe.embeddings)
        self.pooler = None if recipe.pooler is None else model.get_submodule(recipe.pooler)
        self.pre_classifier = model.get_submodule("pre_classifier") if recipe.head == "first_token" else None
        self.classifier = model.get_submodule("classifier")

    @classmethod
    def install(cls, model: nn.Module, architecture: Architecture, layers: list[nn.Module]) -> LeanClassifier | None:
        """The lean forward of ``model`` (a sequence classifier of the family, ``layers`` its encoder layers),
        or None if the family has no recipe or the model lacks one of the recipe's modules."""
        recipe = architecture.classifier_recipe
        if recipe is None or not layers:
            return None
        try:
            return cls(model, recipe, layers)
        except AttributeError:  # another head (a base encoder without one, a custom class)
            return None

    def logits(self, input_ids: Tensor, token_type_ids: Tensor | None, length_groups: LengthGroups) -> Tensor:
        """The classifier's logits for ``input_ids`` ``[B, T]``; every row's attention over its own tokens
        (``length_groups``), so no attention mask is needed."""
        if self.recipe.token_types:
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        else:
            hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, None, length_groups=length_groups)
        head = self.recipe.head
        if head == "pooler":
            return self.classifier(self.pooler(hidden))
        if head == "sequence":
            return self.classifier(hidden)
        return self.classifier(torch.relu(self.pre_classifier(hidden[:, 0])))


#: Module kind -> the field of :class:`_Parts` it fills.
_PART_OF_KIND = dict(zip(ALL_MODULE_KINDS, ("query", "key", "value", "output", "up", "down"), strict=True))


def _linear_paths(model: nn.Module, layers: list[nn.Module]) -> list[dict[str, str]] | None:
    """Each layer's Linear modules as paths inside the layer, by :class:`_Parts` field; None if one is missing."""
    layer_paths = {id(module): path for path, module in model.named_modules()}
    found: list[dict[str, str]] = [{} for _ in layers]
    for index, kind, path, _ in modules_by_kind(model):
        prefix = layer_paths[id(layers[index])] + "." if index < len(layers) else None
        if prefix is None or not path.startswith(prefix):
            return None
        found[index][_PART_OF_KIND[kind]] = path[len(prefix) :]
    return found if all(len(parts) == len(ALL_MODULE_KINDS) for parts in found) else None


def _layer_forward(layer: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs):
    lean: LeanLayers = layer._cogalora_lean
    if layer.training or not lean.enabled:
        return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)
    parts: _Parts = layer._cogalora_parts
    x = hidden_states
    shape = x.shape[:-1]
    heads = (*shape, -1, parts.head_size)
    query = parts.query(x).view(heads).transpose(1, 2)
    key = parts.key(x).view(heads).transpose(1, 2)
    value = parts.value(x).view(heads).transpose(1, 2)
    attended, _ = length_grouped_attention(
        layer, query, key, value, attention_mask, scaling=parts.scaling, length_groups=kwargs.get("length_groups")
    )
    x = _norm(parts.attention_norm, parts.output(attended.reshape(*shape, -1)) + x)
    return _norm(parts.output_norm, parts.down(parts.activation(parts.up(x))) + x)


def _norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
