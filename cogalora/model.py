"""Injection of gated LoRA into a Hugging Face encoder, and the routed forward pass.

:class:`CoGaLoRAModel` wraps an ``AutoModelForSequenceClassification`` model: every target
Linear becomes a :class:`~cogalora.layer.GatedLoraLinear`, every head Linear a
:class:`~cogalora.layer.SlotHead`. Training uses slot 0 (``prepare_for_training``); the serving
repository loads many adapters into slots of one such model (``set_adapter`` / ``reset_adapter``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor, nn

from cogalora.architectures import Site, architecture_of, find_encoder_layers, find_pooler_linears, find_sites
from cogalora.attention import LengthGroups, install_length_grouped_attention
from cogalora.config import CoGaLoRAConfig
from cogalora.int8 import Int8Linear
from cogalora.layer import GatedLoraLinear, SlotHead, SlotLoraLinear
from cogalora.lean_layer import LeanClassifier, LeanLayers
from cogalora.precision import PRECISIONS, Precision, resolve_precision
from cogalora.routing import ForceGates, RoutingState
from cogalora.slots import SlotEntry, SlotTable
from cogalora.variants import PLAIN, AdapterVariant
from cogalora.weights import AdapterWeights


@dataclass
class RoutedOutput:
    """Result of one routed forward."""

    logits: Tensor
    """``[B, C]``; rows of adapters with fewer labels than ``C`` are zero-padded."""
    gate_probs: Tensor
    """``[B, num_sites]`` router probabilities (1 for un-routed adapters, 0 where absent)."""
    gates: Tensor
    """``[B, num_sites]`` bool: whether the site's adapter ran for the row."""
    adapter_rows: int
    """Rows multiplied by an adapter, summed over sites (0 in training's dense path)."""
    ranks: Tensor | None = None
    """``[B, num_sites]`` long: the rank each row used at each site (0 where off; the adapter's rank
    where on, unless a RAD-LoRA router picked a smaller one)."""
    expected_ranks: Tensor | None = None
    """Training only: ``[B, num_sites]`` expected rank under the routers (with grad), for the rank penalty."""


def _replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


class CoGaLoRAModel(nn.Module):
    """A frozen encoder with per-slot gated LoRA adapters and classification heads."""

    def __init__(self, base_model: nn.Module, config: CoGaLoRAConfig) -> None:
        super().__init__()
        self.model = base_model
        self.config = config
        self.architecture = architecture_of(base_model)
        self.length_grouped = install_length_grouped_attention(base_model)
        """Padding-free attention (``cogalora.attention``): batch invariant in every dtype."""
        encoder_layers = find_encoder_layers(base_model) if self.length_grouped else []
        self._can_pack = bool(encoder_layers)
        if encoder_layers:
            encoder_layers[0].register_forward_pre_hook(self._pack_tokens, with_kwargs=True)
            encoder_layers[-1].register_forward_hook(self._unpack_tokens)
        self.sites: list[Site] = find_sites(base_model, config.target_modules) if config.has_adapters else []
        self.slot_table = SlotTable(len(self.sites))
        self.routing = RoutingState(self.slot_table)
        self.gated_layers: dict[str, GatedLoraLinear] = {}
        for site in self.sites:
            layer = GatedLoraLinear(base_model.get_submodule(site.module_path), site, self.routing, config.dropout)
            _replace_module(base_model, site.module_path, layer)
            self.gated_layers[site.module_path] = layer
        self.layers: list[GatedLoraLinear] = list(self.gated_layers.values())
        """Gated layers in site order (``layers[i].site.index == i``)."""
        self.pooler_layers: dict[str, SlotLoraLinear] = {}
        """Always-on LoRA over the pooler's Linear layers (plain LoRA adapters only; not sites)."""
        for path in find_pooler_linears(base_model) if config.has_adapters else []:
            layer = SlotLoraLinear(base_model.get_submodule(path), self.routing)
            _replace_module(base_model, path, layer)
            self.pooler_layers[path] = layer
        self.head_layers: dict[str, SlotHead] = {}
        # The heads as the base model was loaded: prepare_for_training starts from them. A plain dict,
        # not submodules: they are templates, never part of a forward.
        self._head_templates: dict[str, nn.Linear] = {}
        for path in config.head_modules or self.architecture.head_linears:
            template = base_model.get_submodule(path)
            if not isinstance(template, nn.Linear):
                raise ValueError(f"head module {path!r} of {base_model.config.model_type!r} is not a Linear layer")
            head = SlotHead(template, self.routing)
            _replace_module(base_model, path, head)
            self.head_layers[path] = head
            self._head_templates[path] = template
        self.slot_labels: dict[int, list[str]] = {}
        self.slot_scaling: dict[int, tuple[float, dict[str, float]]] = {}
        """slot -> (its scaling, its per-site exceptions): how to unfold ``B`` when reading it back."""
        self.precision: Precision = PRECISIONS["float32"]
        """How the model computes (:meth:`set_precision`)."""
        self.lean_layers = LeanLayers.install(base_model, self.architecture, encoder_layers)
        """Eval forwards of the encoder layers without the family's module tree (``cogalora.lean_layer``)."""
        self.lean_classifier = (
            LeanClassifier.install(base_model, self.architecture, encoder_layers) if self.lean_layers else None
        )
        """The eval forward around those layers, without the family's model-level forward (the same switch:
        ``lean_layers.enabled``)."""

    # ---- properties -----------------------------------------------------------------------

    @property
    def site_names(self) -> list[str]:
        return [site.name for site in self.sites]

    @property
    def packs_tokens(self) -> bool:
        """Whether eval forwards hand the encoder layers the real tokens only (``cogalora.packing``).

        With exact integer products: their sites work on flat tokens. (A float model keeps the padded
        layout: its mixed-adapter products gather per-row matrices over ``[B, T, d]``.)
        """
        return self._can_pack and self.precision.integer_products and not self.training

    @property
    def output_head(self) -> SlotHead:
        return list(self.head_layers.values())[-1]

    @cached_property
    def linear_flops(self) -> tuple[int, int, int]:
        """FLOPs of the base model's Linear layers: ``(per token, per example, per output label)``.

        Per token: every Linear inside the encoder layers. Per example: the rest (BERT's pooler) and
        the hidden head layers. Per label: the output head layer, whose width is the adapter's.
        """
        per_token = per_example = 0
        for path, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                flops = 2 * module.in_features * module.out_features
                if ".layer." in path:
                    per_token += flops
                else:
                    per_example += flops
        heads = list(self.head_layers.values())
        per_example += sum(2 * head.in_features * head.out_capacity for head in heads[:-1])
        return per_token, per_example, 2 * heads[-1].in_features

    # ---- training set-up ------------------------------------------------------------------

    def prepare_for_training(self, labels: list[str]) -> None:
        """Fresh adapter and head in slot 0; freeze what the method does not train."""
        config = self.config
        for param in self.model.parameters():
            param.requires_grad_(config.method == "full")
        for layer in self.layers:
            bank_index = layer.bank_for(config.rank, config.router_hidden, fold_scaling=False, variant=config.variant)
            bank = layer.banks[bank_index]
            row = bank.allocate()
            bank.init_for_training(
                row, config.scaling, config.has_routers, config.router_init_bias, config.router_input_norm
            )
            self.slot_table.set(0, layer.site.index, SlotEntry(bank_index, row, config.has_routers))
            bank.lora_A.requires_grad_(True)
            bank.lora_B.requires_grad_(True)
            for name in bank.router_parameters:
                getattr(bank, name).requires_grad_(config.has_routers)
            if config.method == "galora":
                layer.enable_galora_gate()
        for path, head in self.head_layers.items():
            template = self._head_templates[path]
            weight, bias = template.weight.data, template.bias.data
            if head is self.output_head and weight.shape[0] != len(labels):
                # The base was loaded with another label count: a fresh output layer of the right width.
                std = getattr(self.model.config, "initializer_range", 0.02)
                weight = torch.empty(len(labels), head.in_features).normal_(0.0, std).to(weight)
                bias = torch.zeros(len(labels)).to(bias)
            head.set_slot(0, weight, bias)
            head.weight.requires_grad_(True)
            head.bias.requires_grad_(True)
        self.slot_labels[0] = list(labels)
        self.slot_scaling[0] = (config.scaling, {})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for param in self.parameters() if param.requires_grad]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The trainable weights that decide gates and ranks: routers, their rank heads, GaLoRA's gates.

        They train at the router learning rate; a variant's heads that scale the adapter's output
        (``AdapterVariant.heads_train_with_adapter``) train with the adapter instead.
        """
        found = []
        for layer in self.layers:
            for bank in layer.banks:
                names = bank.GATE_ROUTER if bank.variant.heads_train_with_adapter else bank.router_parameters
                found += [getattr(bank, name) for name in names]
            if layer.galora_gate is not None:
                found.append(layer.galora_gate)
        return [param for param in found if param.requires_grad]

    # ---- slots (serving) ------------------------------------------------------------------

    def set_adapter(self, slot: int, weights: AdapterWeights, labels: list[str], source: str = "adapter") -> None:
        """Load an adapter into ``slot``; its missing sites are left without adapter.

        Shapes are checked before anything is written, so a failure leaves the slot unchanged.
        """
        unknown = sorted(set(weights.lora) - set(self.gated_layers) - set(self.pooler_layers))
        if unknown:
            raise ValueError(f"{source}: adapter modules {unknown[:3]} are not adapter sites of this base model")
        pooled = sorted(set(weights.lora) & set(self.pooler_layers))
        if pooled and weights.routers:
            raise ValueError(f"{source}: the pooler {pooled} can carry plain LoRA only, not a routed adapter")
        missing_heads = sorted(set(self.head_layers) - set(weights.head))
        if missing_heads:
            raise ValueError(f"{source}: head weights missing for {missing_heads}")
        for path, (lora_A, lora_B) in weights.lora.items():
            layer = self.gated_layers.get(path) or self.pooler_layers[path]
            rank = lora_A.shape[0]
            expected_a, expected_b = (rank, layer.base.in_features), (layer.base.out_features, rank)
            if tuple(lora_A.shape) != expected_a or tuple(lora_B.shape) != expected_b:
                raise ValueError(
                    f"{source}: LoRA weights for {path} have shapes A{tuple(lora_A.shape)} B{tuple(lora_B.shape)}, "
                    f"the base model needs A{expected_a} B{expected_b}"
                )
        self.reset_adapter(slot)
        for layer in self.layers:
            path = layer.site.module_path
            if path not in weights.lora:
                continue
            lora_A, lora_B = weights.lora[path]
            router = weights.routers.get(path)
            hidden = router.w1.shape[0] if router is not None else 1
            variant = weights.variant if router is not None else PLAIN
            bank_index = layer.bank_for(lora_A.shape[0], hidden, variant=variant)
            bank = layer.banks[bank_index]
            row = bank.allocate()
            bank.write(row, lora_A.to(bank.lora_A), lora_B.to(bank.lora_B), weights.scaling_at(path), router)
            self.slot_table.set(slot, layer.site.index, SlotEntry(bank_index, row, router is not None))
        for path in pooled:
            self.pooler_layers[path].set_slot(slot, *weights.lora[path], weights.scaling_at(path))
        try:
            for path, head in self.head_layers.items():
                weight, bias = weights.head[path]
                head.set_slot(slot, weight.to(head.weight), bias.to(head.bias), source=f"{source}: {path}")
        except ValueError:
            self.reset_adapter(slot)
            raise
        self.slot_labels[slot] = list(labels)
        self.slot_scaling[slot] = (weights.scaling, dict(weights.site_scaling))

    def reset_adapter(self, slot: int) -> None:
        """Remove the adapter in ``slot`` (its bank rows are reused by later loads)."""
        for layer in self.layers:
            self._drop(layer, slot)
        for head in self.head_layers.values():
            head.reset_slot(slot)
        for pooler in self.pooler_layers.values():
            pooler.reset_slot(slot)
        self.slot_labels.pop(slot, None)
        self.slot_scaling.pop(slot, None)

    def _drop(self, layer: GatedLoraLinear, slot: int) -> None:
        entry = self.slot_table.entry(slot, layer.site.index)
        if entry is not None:
            layer.banks[entry.bank].release(entry.row)
            self.slot_table.set(slot, layer.site.index, None)

    def adapter_weights(self, slot: int = 0) -> AdapterWeights:
        """The adapter in ``slot`` as a checkpoint stores it: own rank, present sites, ``B`` unscaled."""
        scaling, site_scaling = self.slot_scaling.get(slot, (self.config.scaling, {}))
        weights = AdapterWeights(scaling=scaling, site_scaling=dict(site_scaling))
        for layer, entry in zip(self.layers, self.slot_table.entries(slot), strict=True):
            if entry is None:
                continue
            bank = layer.banks[entry.bank]
            if entry.routed:
                weights.variant = bank.variant
            lora_A, lora_B, router = bank.read(entry.row, weights.scaling_at(layer.site.module_path))
            weights.lora[layer.site.module_path] = (lora_A, lora_B)
            if router is not None:
                weights.routers[layer.site.module_path] = router
        for path, pooler in self.pooler_layers.items():
            delta = pooler.read_slot(slot, weights.scaling_at(path))
            if delta is not None:
                weights.lora[path] = delta
        for path, head in self.head_layers.items():
            weights.head[path] = head.get_slot(slot)
        return weights

    def site_present(self, slot: int = 0) -> list[bool]:
        return [entry is not None for entry in self.slot_table.entries(slot)]

    def site_routed(self, slot: int = 0) -> list[bool]:
        return [entry is not None and entry.routed for entry in self.slot_table.entries(slot)]

    def site_ranks(self, slot: int = 0) -> list[int]:
        """The adapter's rank at each site (0 where it has none)."""
        return [
            0 if entry is None else layer.banks[entry.bank].rank
            for layer, entry in zip(self.layers, self.slot_table.entries(slot), strict=True)
        ]

    def site_variants(self, slot: int = 0) -> list[AdapterVariant]:
        """The variant of the slot's router at each site (``PLAIN`` where it has no router)."""
        return [
            layer.banks[entry.bank].variant if entry is not None and entry.routed else PLAIN
            for layer, entry in zip(self.layers, self.slot_table.entries(slot), strict=True)
        ]

    def router_hidden(self, slot: int = 0) -> int:
        """Hidden width of the slot's routers (its banks' width; 0 without routers)."""
        widths = [
            layer.banks[entry.bank].router_hidden
            for layer, entry in zip(self.layers, self.slot_table.entries(slot), strict=True)
            if entry is not None and entry.routed
        ]
        return max(widths, default=0)

    @torch.no_grad()
    def drop_sites(self, site_indices: list[int], slot: int = 0) -> None:
        """Remove adapters from sites (the freezing trick: routers that never fire)."""
        for index in site_indices:
            self._drop(self.layers[index], slot)

    @torch.no_grad()
    def finalize_galora(self, slot: int = 0) -> list[str]:
        """Prune GaLoRA modules with ``|g| < eps`` and fold the remaining gates into B."""
        pruned = []
        for layer, entry in zip(self.layers, self.slot_table.entries(slot), strict=True):
            gate = layer.galora_gate
            if gate is None:
                continue
            layer.galora_gate = None
            if entry is None:
                continue
            if abs(float(gate)) < self.config.galora_prune_eps:
                self._drop(layer, slot)
                pruned.append(layer.site.name)
            else:
                layer.banks[entry.bank].lora_B[entry.row].mul_(gate.detach().to(layer.banks[entry.bank].lora_B))
        return pruned

    def galora_penalty(self) -> Tensor:
        gates = [layer.galora_gate.abs() for layer in self.layers if layer.galora_gate is not None]
        return torch.stack(gates).mean() if gates else torch.zeros(())

    def set_precision(self, precision: Precision | str) -> CoGaLoRAModel:
        """Serve in ``precision`` (``cogalora.precision``): cast to its activation dtype and, for
        ``int8``, compute every Linear of the encoder and every adapter product with exact integer
        sums. One way: a model in ``int8`` is not turned back (load a fresh one)."""
        precision = resolve_precision(precision, next(self.parameters()).device)
        self.cast(precision.activations)
        if precision.integer_products:
            _ = self.linear_flops  # counted on the float layers, before they are replaced
            for layer in [*self.layers, *self.pooler_layers.values()]:
                layer.use_integer_products()
            for path, module in list(self.model.named_modules()):
                if type(module) is nn.Linear:
                    _replace_module(self.model, path, Int8Linear(module))
            if self.lean_layers is not None:
                self.lean_layers.bind()
        self.precision = precision
        return self

    def cast(self, dtype: torch.dtype) -> CoGaLoRAModel:
        """Cast the encoder, adapters and heads to ``dtype``; routers stay float32 (gate decisions)."""
        routers = [
            (bank, name, getattr(bank, name).data)
            for layer in self.layers
            for bank in layer.banks
            for name in bank.router_parameters
        ]
        self.to(dtype)
        for bank, name, data in routers:
            getattr(bank, name).data = data
        return self

    # ---- forward --------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        *,
        slots: Sequence[int] | Tensor | None = None,
        taus: Sequence[float] | Tensor | None = None,
        force_gates: ForceGates = None,
        gather: bool = False,
        lengths: Sequence[int] | None = None,
    ) -> RoutedOutput:
        """Routed forward: row ``i`` uses the adapter in ``slots[i]`` with gate threshold ``taus[i]``.

        ``slots`` and ``taus`` are best given as host lists (a tensor is read back once); by default
        every row uses slot 0 and the config's tau. ``force_gates``: every present adapter on
        (``"on"``, e.g. plain-LoRA warm-up or a dense teacher) or off (``"off"``: the base model).
        ``gather``: per-row gathered adapter products even for a one-adapter batch (see routing).
        ``lengths``: the rows' real token counts if the caller knows them (else read from the mask).
        """
        batch_size = input_ids.shape[0]
        slots = [0] * batch_size if slots is None else (slots.tolist() if isinstance(slots, Tensor) else slots)
        if taus is None:
            taus = [self.config.tau] * batch_size
        elif isinstance(taus, Tensor):
            taus = taus.tolist()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        groups = (
            LengthGroups.from_mask(attention_mask)
            if lengths is None
            else LengthGroups.from_lengths(lengths, attention_mask.device)
        )
        if self.length_grouped:
            if self.packs_tokens and batch_size > 1:
                groups = replace(groups, packed=True)
            inputs["length_groups"] = groups
        lean = self.lean_classifier is not None and self.lean_layers.enabled and not self.training
        with self.routing.route(attention_mask, slots, taus, force_gates, self.training, gather, groups) as state:
            if lean:
                logits = self.lean_classifier.logits(input_ids, token_type_ids, groups)
            else:
                logits = self.model(**inputs).logits
            gate_probs, gates = state.collect()
            ranks, expected_ranks = state.collect_ranks()
            adapter_rows = state.adapter_rows
        return RoutedOutput(
            logits=logits,
            gate_probs=gate_probs,
            gates=gates,
            adapter_rows=adapter_rows,
            ranks=ranks,
            expected_ranks=expected_ranks,
        )

    def _pack_tokens(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Before the first encoder layer of a packing forward: ``[B, T, d]`` -> ``[1, N, d]``."""
        layout = self.routing.packing
        if layout is None:
            return None
        if args:
            return (layout.pack(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": layout.pack(kwargs["hidden_states"])}

    def _unpack_tokens(self, layer: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple | None:
        """After the last encoder layer of a packing forward: ``[1, N, d]`` -> ``[B, T, d]`` (zeros at padding)."""
        layout = self.routing.packing
        if layout is None:
            return None
        if isinstance(output, tuple):
            return (layout.unpack(output[0]), *output[1:])
        return layout.unpack(output)

    def sparsity_penalty(
        self, output: RoutedOutput, site_weights: Tensor | None = None, strength: float | None = None
    ) -> Tensor:
        """``lambda * mean p`` (CoGaLoRA) or ``lambda * mean |g|`` (GaLoRA); zero otherwise.

        ``site_weights`` (``[sites]``, CoGaLoRA): a weighted mean ``sum w p / sum w`` instead, e.g.
        weights proportional to each site's adapter FLOPs make the penalty the expected fraction of
        adapter FLOPs. ``strength``: lambda for this step (a budget controller's), default the config's.
        """
        config = self.config
        strength = config.sparsity_lambda if strength is None else strength
        if config.has_routers and output.gate_probs.numel():
            return strength * expected_active(output.gate_probs, site_weights)
        if config.method == "galora":
            return strength * self.galora_penalty()
        return output.logits.new_zeros(())

    def rank_penalty(self, output: RoutedOutput, strength: float | None = None) -> Tensor:
        """RAD-LoRA: ``rank_lambda * mean E[rank] / rank`` over rows and sites (training outputs); else zero.

        ``E[rank]`` is ``p * sum_k q_k k``: the rank a row is expected to use, gate included, so the
        penalty is the expected fraction of full-rank adapter work (in ranks, not FLOPs).
        """
        config = self.config
        strength = config.rank_lambda if strength is None else strength
        if config.routed_ranks is None or output.expected_ranks is None or not output.expected_ranks.numel():
            return output.logits.new_zeros(())
        return strength * output.expected_ranks.mean() / config.rank


def expected_active(gate_probs: Tensor, site_weights: Tensor | None = None) -> Tensor:
    """Mean gate probability over rows and sites, ``[B, sites]`` -> scalar, optionally site-weighted."""
    if site_weights is None:
        return gate_probs.mean()
    weights = site_weights.to(gate_probs)
    return (gate_probs * weights).sum(dim=1).mean() / weights.sum()
