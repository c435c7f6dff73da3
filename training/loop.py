"""The training run: data → model → AdamW loop → post-processing → final dev evaluation → checkpoint.

One function, :func:`run_training`, serves the ``train`` command and every sweep run, so a
sweep compares methods on exactly the same code path.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cogalora import PACKAGED_MODEL_ID, CheckpointMeta, CoGaLoRAConfig, CoGaLoRAModel, new_model, save_checkpoint
from cogalora.base_model import load_tokenizer
from training.data import (
    Columns,
    EncodedDataset,
    encode,
    infer_label_names,
    iterate,
    label_indices,
    parse_label_names,
    read_examples,
    training_batches,
)
from training.evaluation import evaluate, never_fired

#: Learning rates that work for each family (DESIGN.md §1: LoRA wants ~1e-4..1e-3, full FT ~2e-5).
DEFAULT_ADAPTER_LR = 5e-4
DEFAULT_FULL_LR = 3e-5


@dataclass
class TrainConfig:
    """Everything a training run needs; stored verbatim in the checkpoint's ``training`` field."""

    train: str
    dev: str
    output: str
    method: str = "cogalora"
    base_model: str = PACKAGED_MODEL_ID
    text_column: str | None = None
    label_column: str | None = None
    label_names: str | None = None
    rank: int = 8
    alpha: float = 16.0
    sparsity_lambda: float = 0.1
    tau: float = 0.5
    lr: float | None = None
    """``None``: 5e-4 for adapter methods, 3e-5 for full fine-tuning."""
    router_lr: float | None = None
    """LR of CoGaLoRA routers and GaLoRA gates; ``None``: same as ``lr``."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    seed: int = 0
    max_train_examples: int | None = None
    max_dev_examples: int | None = None
    warmup_gates_on_steps: int = 0
    router_init_bias: float = 2.0
    drop_never_fired: bool = True
    threads: int | None = None
    device: str = "auto"
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_FULL_LR if self.method == "full" else DEFAULT_ADAPTER_LR


@dataclass
class TrainResult:
    output: Path
    metrics: dict
    dropped_sites: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _optimizer(model: CoGaLoRAModel, config: TrainConfig) -> torch.optim.Optimizer:
    lr = config.learning_rate
    router_lr = config.router_lr if config.router_lr is not None else lr
    routers, others = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (routers if ".router_" in name or name.endswith("galora_gate") else others).append(param)
    groups = [{"params": others, "lr": lr}]
    if routers:
        groups.append({"params": routers, "lr": router_lr})
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, warmup: int) -> None:
    """Linear warm-up, then linear decay to zero."""
    factor = (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def load_datasets(config: TrainConfig, tokenizer) -> tuple[list[str], EncodedDataset, EncodedDataset]:
    columns = Columns(config.text_column, config.label_column)
    train_raw = read_examples(config.train, columns, config.max_train_examples)
    dev_raw = read_examples(config.dev, columns, config.max_dev_examples)
    names = parse_label_names(config.label_names) if config.label_names else infer_label_names(train_raw)
    train = encode(train_raw, label_indices(train_raw, names, config.train), tokenizer, config.max_length)
    dev = encode(dev_raw, label_indices(dev_raw, names, config.dev), tokenizer, config.max_length)
    return names, train, dev


def build_model(config: TrainConfig, labels: list[str]) -> CoGaLoRAModel:
    model_config = CoGaLoRAConfig(
        method=config.method,
        rank=config.rank,
        alpha=config.alpha,
        tau=config.tau,
        sparsity_lambda=config.sparsity_lambda,
        router_init_bias=config.router_init_bias,
    )
    return new_model(config.base_model, model_config, labels)


def run_training(config: TrainConfig) -> TrainResult:
    """Train, post-process, evaluate on dev and save a checkpoint to ``config.output``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    device = pick_device(config.device)
    tokenizer = load_tokenizer(config.base_model)
    labels, train_set, dev_set = load_datasets(config, tokenizer)
    seed_everything(config.seed)
    model = build_model(config, labels).to(device)
    optimizer = _optimizer(model, config)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_ratio * total_steps))
    history: list[dict] = []
    step = 0
    started = time.perf_counter()
    for epoch in range(config.epochs):
        batches = training_batches(train_set, config.batch_size, seed=config.seed * 1000 + epoch)
        model.train()
        bar = tqdm(
            total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not config.progress
        )
        smoothed, correct, seen, active, gate_slots = None, 0, 0, 0.0, 0
        for batch in iterate(train_set, batches):
            batch = batch.to(device)
            _set_lr(optimizer, step, total_steps, warmup)
            warming = step < config.warmup_gates_on_steps
            # Warm-up: plain LoRA (every gate on, routers untouched, no penalty), so adapters learn
            # before routers can switch them off.
            out = model(
                batch.input_ids, batch.attention_mask, batch.token_type_ids, force_gates="on" if warming else None
            )
            loss = F.cross_entropy(out.logits, batch.labels)
            if not warming:
                loss = loss + model.sparsity_penalty(out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
            optimizer.step()
            step += 1
            value = float(loss.detach())
            smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
            correct += int((out.logits.detach().argmax(dim=1) == batch.labels).sum())
            seen += len(batch.labels)
            active += float(out.gates.float().sum())
            gate_slots += out.gates.numel()
            bar.set_postfix(
                loss=f"{smoothed:.3f}", acc=f"{correct / seen:.3f}", active=f"{active / max(gate_slots, 1):.2f}"
            )
            bar.update(1)
        bar.close()
        dev_metrics, _ = evaluate(model, dev_set, config.eval_batch_size, device=device)
        entry = {
            "epoch": epoch + 1,
            "train_loss": smoothed,
            "train_accuracy": correct / max(seen, 1),
            "train_active_fraction": active / max(gate_slots, 1),
            "dev_accuracy": dev_metrics["accuracy"],
            "dev_active_fraction": dev_metrics["mean_active_fraction"],
        }
        history.append(entry)
        tqdm.write(json.dumps(entry))
    train_seconds = time.perf_counter() - started

    dropped = _post_process(model, config, dev_set, device)
    metrics, _ = evaluate(model, dev_set, config.eval_batch_size, device=device)
    metrics.update(
        train_seconds=round(train_seconds, 1),
        train_examples=len(train_set),
        dropped_sites=dropped,
        history=history,
    )
    model.to("cpu")
    meta = CheckpointMeta(
        format_version=1,
        method=config.method,
        base_model=config.base_model,
        labels=labels,
        max_length=config.max_length,
        rank=config.rank,
        alpha=config.alpha,
        target_modules=list(model.config.target_modules),
        tau=config.tau,
        router={"hidden": model.config.router_hidden} if config.method == "cogalora" else None,
        metrics=metrics,
        training=asdict(config) | {"lr": config.learning_rate},
        **{"lambda": config.sparsity_lambda},
    )
    save_checkpoint(model, config.output, meta)
    return TrainResult(output=Path(config.output), metrics=metrics, dropped_sites=dropped, history=history)


def _post_process(model: CoGaLoRAModel, config: TrainConfig, dev_set: EncodedDataset, device) -> list[str]:
    """GaLoRA: prune and fold the scalar gates. CoGaLoRA: the freezing trick. Returns removed sites."""
    if config.method == "galora":
        pruned = model.finalize_galora()
        if pruned:
            tqdm.write(f"GaLoRA pruned {len(pruned)} modules: {pruned}")
        return pruned
    if config.method == "cogalora" and config.drop_never_fired:
        _, predictions = evaluate(model, dev_set, config.eval_batch_size, device=device)
        indices = never_fired(predictions, model.site_present())
        model.drop_sites(indices)
        names = [model.site_names[i] for i in indices]
        if names:
            tqdm.write(f"freezing trick: dropped {len(names)} sites whose router never fired on dev: {names}")
        return names
    return []
