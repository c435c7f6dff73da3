"""The training run: data → model → AdamW loop → post-processing → final dev evaluation → checkpoint.

One function, :func:`run_training`, serves the ``train`` command and every sweep run, so a
sweep compares methods on exactly the same code path.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cogalora import (
    METHODS,
    PACKAGED_MODEL_ID,
    CheckpointMeta,
    CoGaLoRAConfig,
    CoGaLoRAModel,
    new_model,
    save_checkpoint,
)
from cogalora.bank import ROUTER_INPUT_NORMS
from cogalora.base_model import load_tokenizer
from cogalora.checkpoint import CheckpointError, read_meta
from cogalora.config import PENALISED_METHODS, ROUTED_METHODS, check_rank_set, parse_rank_set, spoken
from cogalora.gates import DEFAULT_RANK_WARMUP, GATE_ESTIMATORS, RANK_WARMUPS, annealed_temperature
from cogalora.precision import resolve_device
from training.data import (
    Columns,
    EncodedDataset,
    collate,
    encode,
    infer_label_names,
    label_indices,
    parse_label_names,
    read_examples,
    training_batches,
)
from training.distributed import DistributedContext, init_distributed, shutdown_distributed
from training.evaluation import evaluate, never_fired
from training.objective import SPARSITY_WEIGHTS, Objective

log = logging.getLogger(__name__)

#: Which methods an option matters to (``option(methods=...)``); setting it for another one is warned about.
ADAPTER_METHODS: tuple[str, ...] = tuple(method for method in METHODS if method != "full")
RANK_ROUTED: tuple[str, ...] = ("radlora",)

#: Learning rates that work for each family (LoRA wants ~1e-4..1e-3, a full fine-tune ~2e-5).
DEFAULT_ADAPTER_LR = 5e-4
DEFAULT_FULL_LR = 3e-5


#: The model options' defaults are the library's (``CoGaLoRAConfig``): one home for each.
MODEL_DEFAULTS = CoGaLoRAConfig()


class TrainConfigError(ValueError):
    """A training option out of its range; the message names the option."""


class TrainingDivergedError(ValueError):
    """The training loss stopped being a finite number: the weights are no longer usable."""


def option(default: Any = MISSING, help: str = "", group: str = "training", **cli: Any) -> Any:
    """A :class:`TrainConfig` field with what the ``train`` command needs to expose it.

    ``cli`` may hold ``flag`` (default ``--field-name``), ``choices``, for a boolean that
    defaults to True, ``off_flag``: the flag that turns it off, and ``methods``: the methods the
    option matters to (default: all). The field's default, type and help
    are the command's (``training.cli`` builds its parser from these fields).
    """
    return field(default=default, metadata={"help": help, "group": group, **cli})


@dataclass
class TrainConfig:
    """Everything a training run needs; stored verbatim in the checkpoint's ``training`` field.

    The one home of the ``train`` command's options: every field is a flag with this default.
    """

    train: str = option(help="training data (.tsv, .csv or .jsonl)", group="data")
    dev: str = option(help="dev data, same format (evaluated after every epoch)", group="data")
    output: str = option(help="checkpoint directory to write", group="data")
    overwrite: bool = option(
        False, "replace a checkpoint already in --output (default: refuse, e.g. to keep a calibrated model)", "data"
    )
    method: str = option("cogalora", "fine-tuning method", group="model", choices=METHODS)
    base_model: str = option(PACKAGED_MODEL_ID, "base encoder id or local directory", group="model")
    text_column: str | None = option(
        None, "TSV/CSV header name or JSONL key of the text (default: first column / 'text')", group="data"
    )
    label_column: str | None = option(
        None, "TSV/CSV header name or JSONL key of the label (default: last column / 'label')", group="data"
    )
    label_names: str | None = option(
        None,
        "comma-separated label list, e.g. 'negative,positive'; labels in the data may be these names or integer "
        "indices into them (default: sorted unique labels of the training data)",
        group="data",
    )
    rank: int = option(MODEL_DEFAULTS.rank, "LoRA rank r", group="model", methods=ADAPTER_METHODS)
    alpha: float = option(MODEL_DEFAULTS.alpha, "LoRA alpha (scaling alpha/r)", group="model", methods=ADAPTER_METHODS)
    sparsity_lambda: float = option(
        0.1,
        "sparsity penalty weight (CoGaLoRA: lambda * mean p; GaLoRA: lambda * mean |g|); with "
        "--target-active-fraction the starting value of the controlled lambda",
        group="routing",
        flag="--lambda",
        methods=PENALISED_METHODS,
    )
    tau: float = option(
        MODEL_DEFAULTS.tau, "inference gate threshold stored in the checkpoint", group="routing", methods=ROUTED_METHODS
    )
    rank_set: str = option(
        ",".join(map(str, MODEL_DEFAULTS.rank_set)),
        "RAD-LoRA: comma-separated ranks each router may pick per example (0: off; at most --rank); nested: "
        "rank k uses the first k rows of A and columns of B",
        group="routing",
        methods=RANK_ROUTED,
    )
    rank_lambda: float = option(
        0.0,
        "RAD-LoRA: weight of the rank penalty rank_lambda * mean E[rank] / rank, beside the gate penalty --lambda",
        group="routing",
        methods=RANK_ROUTED,
    )
    rank_warmup: str = option(
        DEFAULT_RANK_WARMUP,
        "RAD-LoRA: what adapters train during --warmup-gates-on-steps: the full rank only, or per row and site "
        "a rank drawn uniformly from the nonzero ranks of --rank-set (sampled: every nested rank learns as an adapter)",
        group="routing",
        choices=RANK_WARMUPS,
        methods=RANK_ROUTED,
    )
    lr: float | None = option(
        None, f"learning rate (default {DEFAULT_ADAPTER_LR} for adapter methods, {DEFAULT_FULL_LR} for full)"
    )
    router_lr: float | None = option(
        None, "learning rate of routers / GaLoRA gates (default: --lr)", methods=PENALISED_METHODS
    )
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_ratio: float = option(0.06, "fraction of steps of linear LR warm-up")
    epochs: int = option(1, "passes over the training data")
    batch_size: int = option(32, "training batch size")
    eval_batch_size: int = option(64, "dev evaluation batch size")
    max_length: int = option(128, "truncate inputs to this many tokens", group="data")
    seed: int = option(0, "random seed (runs are deterministic given it)")
    max_train_examples: int | None = option(None, "use only the first N training rows", group="data")
    max_dev_examples: int | None = option(None, "use only the first N dev rows", group="data")
    warmup_gates_on_steps: int = option(
        0,
        "CoGaLoRA: train the first N steps as plain LoRA (all gates on, routers frozen, no penalty)",
        "routing",
        methods=PENALISED_METHODS,
    )
    router_init_bias: float = option(
        MODEL_DEFAULTS.router_init_bias,
        "initial router output bias (sigmoid(2) ~ 0.88: mostly on)",
        "routing",
        methods=ROUTED_METHODS,
    )
    router_input_norm: str = option(
        MODEL_DEFAULTS.router_input_norm,
        "CoGaLoRA: how routers read their mean-pooled input: as is, or standardised over features "
        "(layer_norm: no shrinking with length); stored in the checkpoint",
        "routing",
        choices=ROUTER_INPUT_NORMS,
        methods=ROUTED_METHODS,
    )
    target_active_fraction: float | None = option(
        None,
        "CoGaLoRA: train to this expected active fraction (of sites, or of adapter FLOPs with --sparsity-weights "
        "flops) by dual ascent on lambda, instead of a fixed lambda",
        "routing",
        methods=ROUTED_METHODS,
    )
    target_active_rank: float | None = option(
        None,
        "RAD-LoRA: train to this expected total active rank per example (the sum over sites of the rank used, 0 where "
        "off; 288 = 36 sites at rank 8) by dual ascent on --rank-lambda (its starting value), instead of a fixed one",
        "routing",
        methods=RANK_ROUTED,
    )
    budget_lr: float = option(
        0.01,
        "step size of the dual ascent on lambda (--target-active-fraction) and --rank-lambda",
        "routing",
        methods=ROUTED_METHODS,
    )
    sparsity_weights: str = option(
        "sites",
        "CoGaLoRA: what the penalty and the budget count: every site alike, or each site by its adapter FLOPs",
        "routing",
        choices=SPARSITY_WEIGHTS,
        methods=ROUTED_METHODS,
    )
    distill_weight: float = option(
        0.0,
        "CoGaLoRA: weight of self-distillation in the routed phase, KL(all-gates-on model || routed model)",
        "routing",
        methods=ROUTED_METHODS,
    )
    distill_temperature: float = option(
        1.0, "softmax temperature of self-distillation", "routing", methods=ROUTED_METHODS
    )
    gate_estimator: str = option(
        "ste",
        "CoGaLoRA training gates: straight-through Bernoulli (ste) or relaxed Gumbel-sigmoid (gumbel); "
        "inference always uses p > tau",
        "routing",
        choices=GATE_ESTIMATORS,
        methods=ROUTED_METHODS,
    )
    gate_temperature: float = option(
        1.0, "gumbel estimator: temperature at the start of the routed phase", "routing", methods=ROUTED_METHODS
    )
    gate_temperature_end: float = option(
        0.1, "gumbel estimator: temperature at the end (annealed geometrically)", "routing", methods=ROUTED_METHODS
    )
    drop_never_fired: bool = option(
        True,
        "CoGaLoRA: keep sites whose router never fired on dev (default: drop them, the freezing trick)",
        "routing",
        off_flag="--keep-never-fired",
        methods=ROUTED_METHODS,
    )
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)", "runtime")
    device: str = option("auto", "'auto' (CUDA when available), 'cpu', 'cuda', ...", "runtime")
    progress: bool = option(True, "no progress bar", "runtime", off_flag="--no-progress")

    def __post_init__(self) -> None:
        if self.target_active_fraction is not None:
            if self.method not in ROUTED_METHODS:
                raise TrainConfigError(f"--target-active-fraction needs --method {spoken(ROUTED_METHODS)}")
            if not 0.0 < self.target_active_fraction <= 1.0:
                raise TrainConfigError(
                    f"--target-active-fraction must lie in (0, 1], got {self.target_active_fraction}"
                )
        if self.target_active_rank is not None:
            if self.method != "radlora":
                raise TrainConfigError("--target-active-rank needs --method radlora")
            if self.target_active_rank <= 0:
                raise TrainConfigError(f"--target-active-rank must be > 0, got {self.target_active_rank}")
        if self.method == "radlora":
            try:
                check_rank_set(parse_rank_set(self.rank_set), self.rank)
            except ValueError as exc:
                raise TrainConfigError(f"--rank-set: {exc}") from None
        for name in ("budget_lr", "distill_weight", "rank_lambda"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("distill_temperature", "gate_temperature", "gate_temperature_end"):
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        checks = (
            ("method", METHODS),
            ("router_input_norm", ROUTER_INPUT_NORMS),
            ("sparsity_weights", SPARSITY_WEIGHTS),
            ("gate_estimator", GATE_ESTIMATORS),
            ("rank_warmup", RANK_WARMUPS),
        )
        for name, choices in checks:
            if getattr(self, name) not in choices:
                raise TrainConfigError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")

    def ignored_options(self) -> list[str]:
        """The flags set away from their default that this run's method does not use."""
        ignored = []
        for item in fields(self):
            methods = item.metadata.get("methods")
            if methods is None or self.method in methods or getattr(self, item.name) == item.default:
                continue
            flag = item.metadata.get("flag") or "--" + item.name.replace("_", "-")
            ignored.append(item.metadata.get("off_flag", flag) if item.default is True else flag)
        return ignored

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
    written: bool = True
    """False on the ranks other than 0 of a data-parallel run: they train but write nothing."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(model: CoGaLoRAModel, config: TrainConfig) -> torch.optim.Optimizer:
    lr = config.learning_rate
    router_lr = config.router_lr if config.router_lr is not None else lr
    gates = {id(param) for param in model.gate_parameters()}
    routers, others = [], []
    for param in model.trainable_parameters():
        (routers if id(param) in gates else others).append(param)
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
        router_input_norm=config.router_input_norm,
        rank_set=parse_rank_set(config.rank_set) if config.method == "radlora" else MODEL_DEFAULTS.rank_set,
        rank_lambda=config.rank_lambda,
    )
    model = new_model(config.base_model, model_config, labels)
    model.routing.gate_estimator = config.gate_estimator
    model.routing.rank_warmup = config.rank_warmup
    return model


def build_objective(model: CoGaLoRAModel, config: TrainConfig) -> Objective:
    try:
        return Objective(
            model,
            config.sparsity_lambda,
            sparsity_weights=config.sparsity_weights,
            target_active_fraction=config.target_active_fraction,
            budget_lr=config.budget_lr,
            distill_weight=config.distill_weight,
            distill_temperature=config.distill_temperature,
            target_active_rank=config.target_active_rank,
        )
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from None  # the message names the option


def run_training(config: TrainConfig) -> TrainResult:
    """Train, post-process, evaluate on dev and save a checkpoint to ``config.output``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its shard of each global batch
    and gradients are summed (``training.distributed``); only rank 0 evaluates, shows progress and
    writes the checkpoint (the other ranks return a result with empty metrics).
    """
    check_output(config)
    ignored = config.ignored_options()
    if ignored:
        log.warning("--method %s does not use %s: ignored", config.method, ", ".join(ignored))
    if config.threads:
        torch.set_num_threads(config.threads)
    context, device = init_distributed(resolve_device(config.device))
    try:
        return _train(config, context, device)
    finally:
        shutdown_distributed(context)


def check_output(config: TrainConfig) -> None:
    """Refuse, before any training, to replace a checkpoint in ``config.output`` unless ``overwrite``."""
    output = Path(config.output)
    if config.overwrite or not (output / "cogalora.json").exists():
        return
    try:
        meta = read_meta(output)
        calibration = (meta.model_extra or {}).get("calibration")
        what = f"a {meta.method} checkpoint" + (f", calibrated to tau {meta.tau:g}" if calibration else "")
    except CheckpointError:
        what = "a checkpoint"
    raise TrainConfigError(f"{output} already holds {what}; pass --overwrite to replace it, or choose another --output")


def _train(config: TrainConfig, context: DistributedContext, device: torch.device) -> TrainResult:
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.base_model)
    labels, train_set, dev_set = load_datasets(config, tokenizer)
    seed_everything(config.seed)
    model = build_model(config, labels).to(device)
    objective = build_objective(model, config)
    optimizer = _optimizer(model, config)
    trainable = list(model.trainable_parameters())
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_ratio * total_steps))
    routed_steps = max(1, total_steps - config.warmup_gates_on_steps)
    show = config.progress and context.is_main
    history: list[dict] = []
    step = 0
    started = time.perf_counter()
    for epoch in range(config.epochs):
        batches = training_batches(train_set, config.batch_size, seed=config.seed * 1000 + epoch)
        model.train()
        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not show)
        smoothed, correct, seen, active, gate_slots, expected, routed = None, 0, 0, 0.0, 0, 0.0, 0
        rank_total, expected_rank = 0.0, 0.0
        for global_indices in batches:
            indices = context.shard(global_indices)
            _set_lr(optimizer, step, total_steps, warmup)
            # Warm-up: plain LoRA (every gate on, routers untouched, no penalty), so adapters learn
            # before routers can switch them off.
            warming = step < config.warmup_gates_on_steps
            progress = (step - config.warmup_gates_on_steps) / routed_steps
            model.routing.gate_temperature = annealed_temperature(
                config.gate_temperature, config.gate_temperature_end, progress
            )
            optimizer.zero_grad(set_to_none=True)
            # This shard's share of the global batch: summed over ranks, the gradients and the
            # statistics are those of the whole batch (a single process has share 1).
            share = len(indices) / len(global_indices)
            # loss, correct, rows, active gates, gate slots, expected active * share, ranks, expected rank * share
            local = [0.0] * 8
            if indices:
                batch = collate(train_set, indices).to(device)
                result = objective.step(model, batch, warming, update_budget=False)
                (result.loss * share).backward()
                out = result.output
                local = [
                    float(result.loss.detach()) * share,
                    float((out.logits.detach().argmax(dim=1) == batch.labels).sum()),
                    float(len(indices)),
                    float(out.gates.float().sum()),
                    float(out.gates.numel()),
                    result.expected_active * share,
                    float(out.ranks.sum()) if out.ranks is not None else 0.0,
                    result.expected_rank * share,
                ]
            value, batch_correct, rows, batch_active, batch_slots, measured, batch_ranks, measured_rank = (
                context.all_reduce_sum(trainable, local)
            )
            if not math.isfinite(value):  # every rank reads the same sum: all stop together
                bar.close()
                raise TrainingDivergedError(
                    f"the training loss became {value} at step {step + 1} (epoch {epoch + 1}); nothing was saved. "
                    f"Lower the learning rate (--lr, now {config.learning_rate:g}) and train again"
                )
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            if not warming:
                objective.update_budgets(measured, measured_rank)
            step += 1
            smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
            correct += int(batch_correct)
            seen += int(rows)
            active += batch_active
            gate_slots += int(batch_slots)
            rank_total += batch_ranks
            if not warming:
                expected += measured
                expected_rank += measured_rank
                routed += 1
            postfix = {"loss": f"{smoothed:.3f}", "acc": f"{correct / seen:.3f}"}
            postfix["active"] = f"{active / max(gate_slots, 1):.2f}"
            if config.method == "radlora":
                postfix["rank"] = f"{rank_total / max(seen, 1):.1f}"
            if objective.controller is not None:
                postfix["lambda"] = f"{objective.controller.strength:.3f}"
            if objective.rank_controller is not None:
                postfix["rank_lambda"] = f"{objective.rank_controller.strength:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
        bar.close()
        if not context.is_main:
            continue
        dev_metrics, _ = evaluate(model, dev_set, config.eval_batch_size, device=device)
        entry = {
            "epoch": epoch + 1,
            "train_loss": smoothed,
            "train_accuracy": correct / max(seen, 1),
            "train_active_fraction": active / max(gate_slots, 1),
            "train_expected_active": expected / routed if routed else None,
            "train_expected_active_rank": (
                expected_rank / routed * len(model.sites) * config.rank
                if routed and config.method == "radlora"
                else None
            ),
            "lambda": objective.controller.strength if objective.controller else None,
            "rank_lambda": objective.rank_controller.strength if objective.rank_controller else None,
            "dev_accuracy": dev_metrics["accuracy"],
            "dev_active_fraction": dev_metrics["mean_active_fraction"],
            "dev_adapter_flops_fraction": dev_metrics["adapter_flops_fraction"],
            "dev_mean_active_rank": dev_metrics["mean_active_rank"],
        }
        history.append(entry)
        tqdm.write(json.dumps(entry))
    train_seconds = time.perf_counter() - started
    if not context.is_main:
        return TrainResult(output=Path(config.output), metrics={}, written=False)

    dropped = _post_process(model, config, dev_set, device)
    metrics, _ = evaluate(model, dev_set, config.eval_batch_size, device=device)
    metrics.update(
        train_seconds=round(train_seconds, 1),
        train_examples=len(train_set),
        dropped_sites=dropped,
        history=history,
    )
    if context.enabled:
        metrics["processes"] = context.world_size
    if objective.controller is not None:
        achieved_key = "mean_active_fraction" if config.sparsity_weights == "sites" else "adapter_flops_fraction"
        metrics.update(
            target_active_fraction=config.target_active_fraction,
            budget_error=metrics[achieved_key] - config.target_active_fraction,
            final_lambda=objective.controller.strength,
        )
    if objective.rank_controller is not None:
        metrics.update(
            target_active_rank=config.target_active_rank,
            rank_budget_error=metrics["mean_active_rank"] - config.target_active_rank,
            final_rank_lambda=objective.rank_controller.strength,
        )
    model.to("cpu")
    router = None
    if config.method in ROUTED_METHODS:
        router = {"hidden": model.config.router_hidden, "input_norm": config.router_input_norm}
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
        router=router,
        rank_set=list(model.config.routed_ranks) if model.config.routed_ranks else None,
        rank_lambda=config.rank_lambda if config.method == "radlora" else 0.0,
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
    if config.method in ROUTED_METHODS and config.drop_never_fired:
        _, predictions = evaluate(model, dev_set, config.eval_batch_size, device=device)
        indices = never_fired(predictions, model.site_present())
        model.drop_sites(indices)
        names = [model.site_names[i] for i in indices]
        if names:
            tqdm.write(f"freezing trick: dropped {len(names)} sites whose router never fired on dev: {names}")
        return names
    return []
