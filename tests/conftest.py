"""Shared fixtures: tiny random BERT encoders built in code, so unit tests need no download and no data."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from cogalora import CoGaLoRAConfig, CoGaLoRAModel, FlopBreakdown, FlopModel
from cogalora.bank import AdapterBank

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_WORDS = [f"w{i}" for i in range(60)] + ["good", "bad", "great", "awful", "movie", "plot", "the", "a"]


def tiny_bert_config(num_labels: int = 2, attn_implementation: str = "eager") -> BertConfig:
    return BertConfig(
        vocab_size=5 + len(_WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn_implementation,
    )


def tiny_model(
    config: CoGaLoRAConfig | None = None,
    labels: tuple[str, ...] = ("neg", "pos"),
    seed: int = 0,
    attn_implementation: str = "eager",
):
    """A fresh CoGaLoRA model on a random 2-layer BERT, prepared for training in slot 0.

    Eager attention by default: torch's FLOP counter does not see CPU scaled-dot-product kernels.
    """
    torch.manual_seed(seed)
    base = BertForSequenceClassification(tiny_bert_config(len(labels), attn_implementation)).eval()
    model = CoGaLoRAModel(base, config or CoGaLoRAConfig(rank=4))
    model.prepare_for_training(list(labels))
    return model


def torch_visible_flops(flops: FlopModel, breakdown: FlopBreakdown) -> int:
    """The FLOPs of ``breakdown`` that torch's FlopCounterMode sees: routers, pooling and the output head
    run as per-row multiply-and-sums (batch invariance), which it does not count."""
    return breakdown.total - breakdown.router - flops.head_output_per_example


def bank_row(model: CoGaLoRAModel, site: int, slot: int = 0) -> tuple[AdapterBank, int]:
    """The bank and row holding ``slot``'s adapter at ``site`` (the live, trainable tensors)."""
    entry = model.slot_table.entry(slot, site)
    assert entry is not None, f"slot {slot} has no adapter at site {site}"
    return model.layers[site].banks[entry.bank], entry.row


def randomize_adapter(model: CoGaLoRAModel, seed: int = 1, slot: int = 0) -> None:
    """Give B non-zero values (fresh LoRA has B = 0, which would hide adapter bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site, present in enumerate(model.site_present(slot)):
            if present:
                bank, row = bank_row(model, site, slot)
                bank.lora_B[row].copy_(torch.randn(bank.lora_B[row].shape, generator=generator) * 0.5)


def spread_routers(model: CoGaLoRAModel, factor: float = 40.0, slot: int = 0) -> None:
    """Scale the routers' output weights so gate probabilities sit far from tau (no knife-edge gates);
    RAD-LoRA rank heads get random weights at the same scale, so rows pick different ranks."""
    generator = torch.Generator().manual_seed(slot)
    with torch.no_grad():
        for site, routed in enumerate(model.site_routed(slot)):
            if routed:
                bank, row = bank_row(model, site, slot)
                bank.router_w2[row].mul_(factor)
                if hasattr(bank, "router_rank_w"):
                    rank_w = bank.router_rank_w[row]
                    rank_w.copy_(torch.randn(rank_w.shape, generator=generator) * factor)


def beside_a_cogalora_adapter(model: CoGaLoRAModel):
    """A two-slot tiny model: ``model``'s adapter (2 labels) in slot 0, a routed CoGaLoRA one (3 labels) in
    slot 1; with a mixed batch of five lengths and the slot of each row."""
    other = tiny_model(CoGaLoRAConfig(rank=8, router_init_bias=0.0), labels=("a", "b", "c"), seed=0)
    randomize_adapter(other, seed=5)
    spread_routers(other)
    shared = tiny_model(CoGaLoRAConfig(rank=8), seed=0).eval()
    shared.set_adapter(0, model.adapter_weights(), ["neg", "pos"])
    shared.set_adapter(1, other.adapter_weights(), ["a", "b", "c"])
    ids, mask = batch([4, 11, 7, 2, 9], seed=6)
    return shared, ids, mask, [0, 1, 0, 0, 1]


@pytest.fixture
def tiny_base_dir(tmp_path: Path) -> Path:
    """A tiny random BERT with a word-level tokenizer saved as a local Hugging Face directory.

    The fast tokenizer is built with ``vocab=`` (``vocab_file=`` silently yields an empty vocabulary
    under transformers 5, which would turn every word into [UNK]).
    """
    torch.manual_seed(0)
    directory = tmp_path / "tiny-bert"
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(directory, safe_serialization=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=True)
    assert tokenizer.convert_tokens_to_ids("awful") != tokenizer.unk_token_id
    tokenizer.save_pretrained(directory)
    return directory


def tiny_text(words: int, seed: int = 0) -> str:
    """A random text in the tiny tokenizer's vocabulary (one token per word)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(["good", "bad", "movie", "plot", "the", "w3", "w7", "w11"]) for _ in range(words))


def batch(lengths: list[int], vocab: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids right-padded to the longest length, and the attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(5, vocab, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


def synthetic_checkpoint(
    directory: Path,
    base_model: str,
    labels: list[str],
    method: str = "cogalora",
    seed: int = 0,
    router_bias: float = 0.0,
    max_length: int = 128,
    keep_sites: int | None = None,
    router_input_norm: str = "none",
) -> Path:
    """Save a deterministic, untrained-but-non-trivial adapter: random B, routers near p = 0.5.

    Routers with a zero output bias put gate probabilities on both sides of 0.5, so gates differ
    between inputs: what correctness tests need, independent of any training run. ``keep_sites``:
    only the first N sites keep their adapter. ``router_input_norm``: how the routers read their input.
    """
    from cogalora import CheckpointMeta, new_model, save_checkpoint

    torch.manual_seed(seed)
    config = CoGaLoRAConfig(
        method=method, rank=8, alpha=16.0, router_init_bias=router_bias, router_input_norm=router_input_norm
    )
    model = new_model(base_model, config, labels)
    randomize_adapter(model, seed=seed + 1)
    spread_routers(model)
    if keep_sites is not None:  # as the freezing trick leaves it: only the first sites keep an adapter
        model.drop_sites(list(range(keep_sites, len(model.sites))))
    meta = CheckpointMeta(
        format_version=1,
        method=method,
        base_model=base_model,
        labels=labels,
        max_length=max_length,
        rank=config.rank,
        alpha=config.alpha,
        target_modules=list(config.target_modules),
        tau=0.5,
        router={"hidden": config.router_hidden} if config.has_routers else None,
        # A nominal dev reference (every site fires for half the inputs) so the drift gauge has one.
        metrics={"synthetic": True, "per_module_activation_rate": dict.fromkeys(model.site_names, 0.5)},
        **{"lambda": 0.0},
    )
    return save_checkpoint(model, directory, meta)


def poison_weights(path: Path, part: str = "", value: float = float("nan"), count: int = 1) -> str:
    """Write ``value`` into the first ``count`` entries of the first tensor of the safetensors file ``path``
    whose name contains ``part`` (any, by default), as a diverged training run or a damaged export would;
    returns that tensor's name."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    key = next(key for key in sorted(tensors) if part in key)
    tensors[key].view(-1)[:count] = value
    save_file(tensors, str(path))
    return key


def peft_lora_folder(base: str | Path, directory: Path, num_labels: int = 3, seed: int = 0, **lora):
    """A plain PEFT LoRA sequence classifier saved by PEFT's own ``save_pretrained`` (what users bring),
    with random non-zero ``lora_B`` (fresh LoRA has B = 0); returns the PeftModel in eval mode.

    ``lora``: LoraConfig arguments (``r``, ``target_modules``, ``rank_pattern``, ``use_rslora`` ...).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=num_labels, ignore_mismatched_sizes=True
    )
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="session")
def minilm_model_dir(tmp_path_factory) -> Path:
    """A model repository on the real packaged all-MiniLM-L6-v2: two routed adapters and a plain LoRA.

    ``sst2`` (negative/positive) and ``agnews`` (four topics) are CoGaLoRA, ``plain`` is LoRA.
    Weights are synthetic (seeded), so tests do not depend on a training run's outcome.
    """
    from cogalora import PACKAGED_MODEL_ID

    root = tmp_path_factory.mktemp("models")
    synthetic_checkpoint(root / "sst2", PACKAGED_MODEL_ID, ["negative", "positive"], seed=0)
    synthetic_checkpoint(root / "agnews", PACKAGED_MODEL_ID, ["World", "Sports", "Business", "Sci/Tech"], seed=10)
    synthetic_checkpoint(root / "plain", PACKAGED_MODEL_ID, ["negative", "positive"], method="lora", seed=20)
    return root


# ---- running the service -------------------------------------------------------------------------
# Two ways, one fixture each: in process (``api_fakes.running(app)`` around an httpx ASGI client) and
# as a real ``python -m service`` process (``start_service``).


@pytest.fixture(scope="session")
def start_service(tmp_path_factory):
    """Start real ``python -m service`` processes and wait until ready: ``start_service(model_dir, **env)``.

    Every process started is stopped at the end of the session (or earlier by the test).
    """
    from processes import ServiceProcess

    started: list[ServiceProcess] = []

    def start(model_dir: Path, wait: bool = True, **env: str) -> ServiceProcess:
        process = ServiceProcess(model_dir, tmp_path_factory.mktemp("service") / "service.log", env)
        started.append(process)
        if wait:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def keyed_service(minilm_model_dir, start_service):
    """One real ``python -m service`` with an API key (``API_KEY``) and JSON logs, shared by the end-to-end
    test and the protocol-client tests (one start-up for all of them). Tests compare metric deltas."""
    from processes import API_KEY, IGNORED_BY_FLAGS

    return start_service(
        minilm_model_dir,
        COGALORA_API_KEY=API_KEY,
        COGALORA_LOG_FORMAT="json",
        COGALORA_LOG_LEVEL="INFO",
        **IGNORED_BY_FLAGS,
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: tests that compare results stay quick on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Described:
    """An engine whose answers come back named, as the HTTP layer names them (``service.results``):
    ``classify`` and ``run_batch`` give wire ``RowResult`` objects instead of the engine's ``RowOutput``."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def classify(self, request):
        from service.results import describe

        adapter = self.engine.repository.acquire(request.adapter)
        try:
            rows = self.engine.tokenize(adapter, list(request.texts), request.truncate, request.threshold)
        finally:
            self.engine.repository.release(adapter)
        outputs = self.engine.classify(request)
        return [describe(row, output) for row, output in zip(rows, outputs, strict=True)]

    def run_batch(self, rows):
        from service.engine import EngineRun
        from service.results import describe

        outcome = self.engine.run_batch(rows)
        return EngineRun([describe(row, out) for row, out in zip(rows, outcome.results, strict=True)], outcome.stats)

    def __getattr__(self, name):
        return getattr(self.engine, name)
