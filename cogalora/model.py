"""Injection of gated LoRA into a Hugging Face encoder, and the routed forward pass.

:class:`CoGaLoRAModel` wraps an ``AutoModelForSequenceClassification`` model: every
target Linear becomes a :class:`~cogalora.layer.GatedLoraLinear`, every head Linear a
:class:`~cogalora.layer.SlotLinear`. Training uses slot 0; the serving engine loads
many adapters into the slots of one such model (``set_adapter`` / ``reset_adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cogalora.architectures import Site, architecture_of, find_sites
from cogalora.config import CoGaLoRAConfig
from cogalora.layer import GatedLoraLinear, SlotLinear
from cogalora.routing import ForceGates, RoutingState
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


def _replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


class CoGaLoRAModel(nn.Module):
    """A frozen encoder with slot-indexed gated LoRA adapters and classification heads."""

    def __init__(self, base_model: nn.Module, config: CoGaLoRAConfig, num_slots: int = 1) -> None:
        super().__init__()
        self.model = base_model
        self.config = config
        self.architecture = architecture_of(base_model)
        self.sites: list[Site] = find_sites(base_model, config.target_modules) if config.has_adapters else []
        self.routing = RoutingState(len(self.sites))
        self.gated_layers: dict[str, GatedLoraLinear] = {}
        for site in self.sites:
            layer = GatedLoraLinear(
                base_model.get_submodule(site.module_path),
                site,
                self.routing,
                num_slots=num_slots,
                rank=config.rank,
                router_hidden=config.router_hidden,
                dropout=config.dropout,
            )
            _replace_module(base_model, site.module_path, layer)
            self.gated_layers[site.module_path] = layer
        self.head_layers: dict[str, SlotLinear] = {}
        self._head_templates: dict[str, nn.Linear] = {}
        for path in config.head_modules or self.architecture.head_linears:
            template = base_model.get_submodule(path)
            if not isinstance(template, nn.Linear):
                raise ValueError(f"head module {path!r} of {base_model.config.model_type!r} is not a Linear layer")
            head = SlotLinear(template, self.routing, num_slots, out_capacity=template.out_features)
            _replace_module(base_model, path, head)
            self.head_layers[path] = head
            self._head_templates[path] = template
        self.slot_labels: list[list[str] | None] = [None] * num_slots

    # ---- set-up ---------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return len(self.slot_labels)

    @property
    def site_names(self) -> list[str]:
        return [site.name for site in self.sites]

    def prepare_for_training(self, labels: list[str]) -> None:
        """Fresh adapter and head in slot 0; freeze what the method does not train."""
        config = self.config
        self.slot_labels[0] = list(labels)
        for param in self.model.parameters():
            param.requires_grad_(config.method == "full")
        for layer in self.gated_layers.values():
            layer.init_slot_for_training(0, config.scaling, config.has_routers, config.router_init_bias)
            if config.method == "galora":
                layer.enable_galora_gate()
            for param in (layer.lora_A, layer.lora_B):
                param.requires_grad_(True)
            for param in layer.routers.parameters():
                param.requires_grad_(config.has_routers)
        for path, head in self.head_layers.items():
            template = self._head_templates[path]
            weight, bias = template.weight.data, template.bias.data
            if path == list(self.head_layers)[-1] and weight.shape[0] != len(labels):
                # The base was loaded with another label count: a fresh output layer of the right width.
                std = getattr(self.model.config, "initializer_range", 0.02)
                weight = torch.empty(len(labels), template.in_features).normal_(0.0, std).to(weight)
                bias = torch.zeros(len(labels)).to(bias)
                head = SlotLinear(nn.Linear(template.in_features, len(labels)), self.routing, 1, len(labels))
                _replace_module(self.model, path, head)
                self.head_layers[path] = head
            head.set_slot(0, weight, bias)
            head.weight.requires_grad_(True)
            head.bias.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [param for param in self.parameters() if param.requires_grad]

    # ---- slots (serving) ------------------------------------------------------------------

    def resize_slots(self, num_slots: int, rank: int, router_hidden: int, num_labels: int) -> None:
        """Grow capacity so that an adapter of this rank, router width and label count fits."""
        for layer in self.gated_layers.values():
            layer.resize(num_slots, rank, router_hidden)
        output_path = list(self.head_layers)[-1]
        for path, head in self.head_layers.items():
            head.resize(num_slots, num_labels if path == output_path else head.weight.shape[1])
        self.slot_labels += [None] * (num_slots - len(self.slot_labels))

    def set_adapter(self, slot: int, weights: AdapterWeights, labels: list[str], source: str = "adapter") -> None:
        """Load an adapter into ``slot``; its missing sites are left without adapter."""
        unknown = sorted(set(weights.lora) - set(self.gated_layers))
        if unknown:
            raise ValueError(f"{source}: adapter modules {unknown[:3]} are not adapter sites of this base model")
        missing_heads = sorted(set(self.head_layers) - set(weights.head))
        if missing_heads:
            raise ValueError(f"{source}: head weights missing for {missing_heads}")
        ranks = {a.shape[0] for a, _ in weights.lora.values()}
        hidden = {r.w1.shape[0] for r in weights.routers.values()}
        self.resize_slots(
            max(self.num_slots, slot + 1),
            max(ranks, default=1),
            max(hidden, default=1),
            weights.head[list(self.head_layers)[-1]][0].shape[0],
        )
        for path, layer in self.gated_layers.items():
            if path in weights.lora:
                lora_A, lora_B = weights.lora[path]
                layer.set_slot(slot, lora_A, lora_B, weights.scaling, weights.routers.get(path), source)
            else:
                layer.reset_slot(slot)
        for path, head in self.head_layers.items():
            head.set_slot(slot, *weights.head[path], source=f"{source}: {path}")
        self.slot_labels[slot] = list(labels)

    def reset_adapter(self, slot: int) -> None:
        for layer in self.gated_layers.values():
            layer.reset_slot(slot)
        for head in self.head_layers.values():
            head.reset_slot(slot)
        self.slot_labels[slot] = None

    def adapter_weights(self, slot: int = 0) -> AdapterWeights:
        """The adapter in ``slot``, trimmed to its true rank and present sites (for saving)."""
        weights = AdapterWeights(scaling=self.config.scaling)
        for path, layer in self.gated_layers.items():
            if not bool(layer.slot_present[slot]):
                continue
            rank = self.config.rank
            weights.scaling = float(layer.scaling[slot])
            weights.lora[path] = (
                layer.lora_A[slot, :rank].detach().clone(),
                layer.lora_B[slot, :, :rank].detach().clone(),
            )
            if bool(layer.slot_routed[slot]):
                weights.routers[path] = layer.routers.get_slot(slot)
        for path, head in self.head_layers.items():
            weights.head[path] = head.get_slot(slot)
        return weights

    def site_present(self, slot: int = 0) -> list[bool]:
        return [bool(self.gated_layers[site.module_path].slot_present[slot]) for site in self.sites]

    def site_routed(self, slot: int = 0) -> list[bool]:
        return [bool(self.gated_layers[site.module_path].slot_routed[slot]) for site in self.sites]

    @torch.no_grad()
    def drop_sites(self, site_indices: list[int], slot: int = 0) -> None:
        """Remove adapters from sites (the freezing trick: routers that never fire)."""
        for index in site_indices:
            self.gated_layers[self.sites[index].module_path].reset_slot(slot)

    @torch.no_grad()
    def finalize_galora(self, slot: int = 0) -> list[str]:
        """Prune GaLoRA modules with ``|g| < eps`` and fold the remaining gates into B."""
        pruned = []
        for site in self.sites:
            layer = self.gated_layers[site.module_path]
            if layer.galora_gate is None:
                continue
            if abs(float(layer.galora_gate[slot])) < self.config.galora_prune_eps:
                layer.reset_slot(slot)
                pruned.append(site.name)
            layer.fold_galora_gate()
        return pruned

    def galora_gates(self, slot: int = 0) -> list[float]:
        return [
            float(layer.galora_gate[slot]) if layer.galora_gate is not None else 1.0
            for layer in self.gated_layers.values()
        ]

    # ---- forward --------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        *,
        slots: Tensor | None = None,
        taus: Tensor | None = None,
        force_gates: ForceGates = None,
    ) -> RoutedOutput:
        """Routed forward: each row uses the adapter in ``slots[row]`` with threshold ``taus[row]``."""
        batch_size = input_ids.shape[0]
        device = input_ids.device
        if slots is None:
            slots = torch.zeros(batch_size, dtype=torch.long, device=device)
        if taus is None:
            taus = torch.full((batch_size,), self.config.tau, device=device)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        with self.routing.route(attention_mask, slots, taus, force_gates) as state:
            logits = self.model(**inputs).logits
            gate_probs, gates = state.collect(batch_size, device)
            adapter_rows = state.adapter_rows
        return RoutedOutput(logits=logits, gate_probs=gate_probs, gates=gates, adapter_rows=adapter_rows)

    def sparsity_penalty(self, output: RoutedOutput) -> Tensor:
        """``lambda * mean p`` (CoGaLoRA) or ``lambda * mean |g|`` (GaLoRA); zero otherwise."""
        config = self.config
        if config.method == "cogalora" and output.gate_probs.numel():
            return config.sparsity_lambda * output.gate_probs.mean()
        if config.method == "galora":
            gates = [layer.galora_gate[0].abs() for layer in self.gated_layers.values()]
            return config.sparsity_lambda * torch.stack(gates).mean()
        return output.logits.new_zeros(())
