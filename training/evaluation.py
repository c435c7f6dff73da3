"""Evaluation: accuracy, gates and analytic FLOPs of a model on a labelled data set.

The one function training (per-epoch dev), the ``evaluate`` and ``calibrate`` commands and
the sweep all call, so every reported number comes from the same code.

Active adapters are counted over all adapter sites the method was trained with (36 for
MiniLM's default targets): sites pruned by GaLoRA or dropped by the freezing trick count as
off. Plain LoRA has every site active (fraction 1); a full fine-tune has no adapter sites,
so it reports 0 active adapters and fraction 0. ``adapter_flops_fraction`` is the adapter FLOPs
spent against plain LoRA's on the same inputs (every site on, same rank): sites differ in cost,
so it is the compute counterpart of the active fraction. ``mean_active_rank`` is the sum over
sites of the rank each example used (0 where off), averaged over examples: 288 for plain LoRA at
rank 8 on 36 sites, 8 x active sites for CoGaLoRA, less where RAD-LoRA routers pick smaller ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cogalora import CoGaLoRAModel, FlopModel
from cogalora.flops import adapter_flops_per_token
from training.data import EncodedDataset, evaluation_batches, iterate


@dataclass
class Predictions:
    """Per-example outputs in dataset order."""

    predicted: Tensor
    """``[N]`` predicted label index."""
    gates: Tensor
    """``[N, sites]`` bool."""
    gate_probs: Tensor
    """``[N, sites]`` router probabilities (1 for un-routed sites, 0 for absent ones)."""
    tokens: Tensor
    """``[N]`` real (unpadded) token count, special tokens included."""
    ranks: Tensor
    """``[N, sites]`` the rank each example used at each site (0 where off)."""


@torch.no_grad()
def predict(
    model: CoGaLoRAModel,
    dataset: EncodedDataset,
    batch_size: int = 64,
    tau: float | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Predictions:
    """Hard-gated eval-mode forward over the data set; ``tau`` overrides the model's threshold."""
    was_training = model.training
    model.eval()
    num_sites = len(model.sites)
    count = len(dataset)
    predicted = torch.zeros(count, dtype=torch.long)
    gates = torch.zeros(count, num_sites, dtype=torch.bool)
    probs = torch.zeros(count, num_sites)
    tokens = torch.zeros(count, dtype=torch.long)
    ranks = torch.zeros(count, num_sites, dtype=torch.long)
    batches = evaluation_batches(dataset, batch_size)
    bar = tqdm(total=count, desc="evaluate", unit="ex", disable=not progress, leave=False)
    try:
        for batch in iterate(dataset, batches):
            batch = batch.to(device)
            taus = None if tau is None else torch.full((len(batch.indices),), float(tau), device=device)
            out = model(batch.input_ids, batch.attention_mask, batch.token_type_ids, taus=taus)
            rows = batch.indices.cpu()
            num_labels = len(model.slot_labels[0] or []) or out.logits.shape[1]
            predicted[rows] = out.logits[:, :num_labels].argmax(dim=1).cpu()
            gates[rows] = out.gates.cpu()
            probs[rows] = out.gate_probs.float().cpu()
            tokens[rows] = batch.attention_mask.sum(dim=1).cpu()
            ranks[rows] = out.ranks.cpu()
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return Predictions(predicted=predicted, gates=gates, gate_probs=probs, tokens=tokens, ranks=ranks)


def summarize(model: CoGaLoRAModel, predictions: Predictions, labels: list[int]) -> dict:
    """The metrics every report uses (the ``evaluate`` JSON contract and ``cogalora.json``)."""
    target = torch.tensor(labels, dtype=torch.long)
    count = len(labels)
    num_sites = len(model.sites)
    active = predictions.gates.sum(dim=1).float()
    flop_model = FlopModel.for_slot(model)
    # Plain LoRA's adapter cost: every site the method was trained on, at the configured rank.
    lora_per_token = sum(adapter_flops_per_token(site, model.config.rank) for site in model.sites)
    totals, adapters = [], []
    for row in range(count):
        flops = flop_model.request(
            int(predictions.tokens[row]), predictions.gates[row].tolist(), ranks=predictions.ranks[row].tolist()
        )
        totals.append(flops.total)
        adapters.append(flops.adapter)
    lora_adapter_flops = lora_per_token * float(predictions.tokens.sum())
    rates = predictions.gates.float().mean(dim=0).tolist() if count else [0.0] * num_sites
    return {
        "accuracy": float((predictions.predicted == target).float().mean()) if count else 0.0,
        "examples": count,
        "mean_active_adapters": float(active.mean()) if count else 0.0,
        "total_adapters": num_sites,
        "mean_active_fraction": float(active.mean() / num_sites) if count and num_sites else 0.0,
        "mean_active_rank": float(predictions.ranks.sum(dim=1).float().mean()) if count else 0.0,
        "mean_flops": sum(totals) / max(count, 1),
        "mean_adapter_flops": sum(adapters) / max(count, 1),
        "adapter_flops_fraction": sum(adapters) / lora_adapter_flops if lora_adapter_flops else 0.0,
        "mean_tokens": float(predictions.tokens.float().mean()) if count else 0.0,
        "per_module_activation_rate": dict(zip(model.site_names, rates, strict=True)),
    }


def evaluate(
    model: CoGaLoRAModel,
    dataset: EncodedDataset,
    batch_size: int = 64,
    tau: float | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict, Predictions]:
    predictions = predict(model, dataset, batch_size, tau, device, progress)
    return summarize(model, predictions, dataset.labels), predictions


def compare_predictions(reference: Predictions, other: Predictions) -> dict:
    """How far ``other`` (e.g. a bfloat16 run) departs from ``reference`` (float32) on the same data."""
    differing = reference.gates != other.gates
    return {
        "gates_differing": int(differing.sum()),
        "gates_differing_fraction": float(differing.float().mean()) if differing.numel() else 0.0,
        "labels_differing": int((reference.predicted != other.predicted).sum()),
    }


def never_fired(predictions: Predictions, site_present: list[bool]) -> list[int]:
    """Indices of present sites whose gate was off for every example (the freezing trick's victims)."""
    fired = predictions.gates.any(dim=0).tolist()
    return [i for i, (on, present) in enumerate(zip(fired, site_present, strict=True)) if present and not on]


def format_table(metrics: dict) -> str:
    """A human-readable summary of :func:`summarize`'s output."""
    lines = [
        f"accuracy              {metrics['accuracy']:.4f}",
        f"examples              {metrics['examples']}",
        f"active adapters       {metrics['mean_active_adapters']:.2f} / {metrics['total_adapters']}",
        f"active fraction       {metrics['mean_active_fraction']:.3f}",
        f"total active rank     {metrics['mean_active_rank']:.1f}",
        f"mean FLOPs            {metrics['mean_flops']:.4g}",
        f"mean adapter FLOPs    {metrics['mean_adapter_flops']:.4g}",
        f"adapter FLOPs vs LoRA {metrics['adapter_flops_fraction']:.3f}",
        f"mean tokens           {metrics['mean_tokens']:.1f}",
    ]
    if "gates_differing_fraction" in metrics:
        lines += [
            f"dtype                 {metrics['dtype']} (float32 accuracy {metrics['accuracy_float32']:.4f})",
            f"gates differing       {metrics['gates_differing']} ({metrics['gates_differing_fraction']:.4%})",
            f"labels differing      {metrics['labels_differing']}",
        ]
    rates = metrics.get("per_module_activation_rate") or {}
    if rates:
        lines.append("per-module activation rate:")
        lines += [f"  {name:<32} {rate:.3f}" for name, rate in rates.items()]
    return "\n".join(lines)
