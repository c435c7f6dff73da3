"""Execution engine: train/serve equivalence, batch invariance, zero work when off, per-row errors."""

from __future__ import annotations

import itertools
import platform
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, Described, peft_lora_folder, synthetic_checkpoint, tiny_text, torch_visible_flops
from torch.utils.flop_counter import FlopCounterMode

import cogalora.layer
from cogalora import PACKAGED_MODEL_ID, load_base_model, load_model, read_adapter, resolve_base_model
from service.engine import Engine, PreparedRow
from service.engine_tuning import length_chunks
from service.errors import AdapterUnloadedError, InferenceError, InputTooLongError, UnknownAdapterError
from service.repository import ModelRepository
from service.schemas import RowResult
from service.types import ClassifyRequest

FALLBACK_SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "the plot is nothing but boilerplate clichés from start to finish",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .",
    "bad",
    "the film is strictly routine .",
    "a masterpiece four years in the making , and one of the most thoughtful films about art , ethics , "
    "and the cost of moral compromise in recent memory",
]


def sentences(count: int) -> list[str]:
    """Real full SST-2 sentences when the shared data is present, else prefixes of a fixed list."""
    path = SHARED_DATA / "sst2-sentences" / "dev.tsv"
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()[1 : count + 1]
        return [line.split("\t")[0] for line in lines]
    words = " ".join(FALLBACK_SENTENCES).split()
    return [" ".join(words[i % 7 : i % 7 + 1 + (5 * i) % 37]) for i in range(count)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scanned(model_dir: Path, **options) -> ModelRepository:
    repository = ModelRepository(model_dir, **options)
    assert repository.scan() == {}
    return repository


@pytest.fixture(scope="module")
def minilm_engine(minilm_model_dir: Path) -> Engine:
    return Described(Engine(scanned(minilm_model_dir), tune_malloc=False))


@pytest.fixture
def tiny_dir(tmp_path: Path, tiny_base_dir: Path) -> Path:
    root = tmp_path / "models"
    synthetic_checkpoint(root / "two", str(tiny_base_dir), ["neg", "pos"], seed=0, max_length=16)
    synthetic_checkpoint(root / "three", str(tiny_base_dir), ["x", "y", "z"], seed=4)
    synthetic_checkpoint(root / "other", str(tiny_base_dir), ["neg", "pos"], seed=8)
    return root


@pytest.fixture
def tiny_engine(tiny_dir: Path) -> Engine:
    return Described(Engine(scanned(tiny_dir), tune_malloc=False))


def prepare(engine: Engine, request: ClassifyRequest) -> list[PreparedRow]:
    """Tokenized rows of one request (the pin is returned at once: these tests unload nothing)."""
    adapter = engine.repository.acquire(request.adapter)
    engine.repository.release(adapter)
    return engine.tokenize(adapter, list(request.texts), request.truncate, request.threshold)


def torch_counted(row: PreparedRow, result: RowResult) -> int:
    """The FLOPs torch's counter sees of a result: its reported total less routers and output head."""
    active = dict(zip(result.active_modules, result.active_ranks, strict=True))
    names = row.adapter.encoder.site_names
    ranks = [active.get(name, 0) for name in names]
    breakdown = row.adapter.flops.request(row.tokens, [name in active for name in names], ranks=ranks)
    assert breakdown.total == result.flops.total
    return torch_visible_flops(row.adapter.flops, breakdown)


def probabilities(result: RowResult, labels: list[str]) -> list[float]:
    by_label = {item.label: item.score for item in result.scores}
    return [by_label[label] for label in labels]


# ---- equivalence with the training model ----------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("adapter", ["sst2", "agnews", "plain"])
def test_engine_matches_training_model_in_eval(minilm_engine: Engine, minilm_model_dir: Path, adapter: str) -> None:
    texts = sentences(12)
    loaded = load_model(minilm_model_dir / adapter)
    labels = loaded.meta.labels
    encoded = loaded.tokenizer(
        texts, padding=True, truncation=True, max_length=loaded.meta.max_length, return_tensors="pt"
    )
    with torch.inference_mode():
        reference = loaded.model(**encoded)
    ref_probs = torch.softmax(reference.logits, dim=-1)
    site_names = loaded.model.site_names

    results = minilm_engine.classify(ClassifyRequest(texts=texts, adapter=adapter))
    any_on = any_off = False
    for row, result in enumerate(results):
        expected_modules = [name for name, on in zip(site_names, reference.gates[row].tolist(), strict=True) if on]
        assert result.active_modules == expected_modules
        assert probabilities(result, labels) == pytest.approx(ref_probs[row].tolist(), abs=1e-4)
        assert result.total_adapters == len(site_names) == 36
        assert result.tokens == int(encoded["attention_mask"][row].sum())
        any_on |= bool(expected_modules)
        any_off |= len(expected_modules) < len(site_names)
    assert any_on, "the comparison must include active adapters"
    if adapter != "plain":
        assert any_off, "routed adapters must switch some modules off on these inputs"


# ---- batch invariance ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_minilm_dir(minilm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MiniLM repository (two CoGaLoRA adapters, a plain LoRA) plus a RAD-LoRA adapter and a PEFT
    folder adapting every Linear (BERT's pooler included)."""
    root = tmp_path_factory.mktemp("mixed")
    for folder in minilm_model_dir.iterdir():
        shutil.copytree(folder, root / folder.name)
    synthetic_checkpoint(root / "rad", PACKAGED_MODEL_ID, ["negative", "positive"], method="radlora", seed=30)
    peft_lora_folder(resolve_base_model(PACKAGED_MODEL_ID), root / "peft", r=4, target_modules="all-linear")
    return root


def bit_pattern(result: RowResult) -> tuple:
    """Everything a row's answer says, as exact values."""
    return (
        result.label,
        [(item.label, item.score) for item in result.scores],
        [(item.label, item.score) for item in result.raw_scores],
        result.active_modules,
        result.active_ranks,
        result.flops,
    )


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["int8", "float32"])
def test_batch_invariance_mixed_adapters_lengths_and_taus(mixed_minilm_dir: Path, precision: str) -> None:
    """A row's answer alone and inside batches of 1 to 64 rows of other adapters, methods, lengths and
    taus: bit for bit in int8 (exact integer products), on one and on two threads; float32 products
    round in a batch-dependent order, so there only to 1e-5."""
    engine = Described(Engine(scanned(mixed_minilm_dir, precision=precision), tune_malloc=False))
    texts = sentences(64)
    adapters = ["sst2", "agnews", "plain", "rad", "peft"]
    taus = [None, 0.3, 0.7]
    requests = [
        ClassifyRequest(texts=[text], adapter=adapters[i % 5], threshold=taus[(i // 5) % 3])
        for i, text in enumerate(texts)
    ]
    alone = [engine.classify(request)[0] for request in requests]
    assert len({result.tokens for result in alone}) > 10, "needs mixed lengths"
    assert len({len(result.active_modules) for result in alone}) > 3, "needs varied gate patterns"
    assert any(0 < rank < 8 for result in alone for rank in result.active_ranks), "needs RAD-LoRA's smaller ranks"
    rows = [row for request in requests for row in prepare(engine, request)]
    threads = torch.get_num_threads()
    try:
        runs = [(1, True, (64, 33, 17, 5, 2)), (1, False, (64, 8)), (2, True, (64, 3))]
        for thread_count, split_by_length, sizes in runs:
            torch.set_num_threads(thread_count)
            batched = Described(Engine(engine.repository, split_by_length=split_by_length, tune_malloc=False))
            for size in sizes:
                for start in range(0, 64, size):
                    outcome = batched.run_batch(rows[start : start + size])
                    for single, in_batch in zip(alone[start : start + size], outcome.results, strict=True):
                        assert isinstance(in_batch, RowResult)
                        if precision == "int8":
                            assert bit_pattern(in_batch) == bit_pattern(single), (thread_count, size, start)
                            continue
                        assert in_batch.active_modules == single.active_modules
                        assert in_batch.label == single.label
                        labels = [item.label for item in single.scores]
                        assert probabilities(in_batch, labels) == pytest.approx(probabilities(single, labels), abs=1e-5)
                        assert in_batch.flops == single.flops
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("precision", ["float32", "int8"])
@pytest.mark.parametrize("adapters", [1, 3, 50])
def test_gathered_path_equals_the_one_adapter_path(
    tmp_path: Path, tiny_base_dir: Path, adapters: int, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of 1, 3 or 50 adapters in one gathered batch: each as it scores alone on its own adapter (in
    int8 bit for bit, with stacks of two rank-8 adapters: several stacked products per site)."""
    monkeypatch.setattr(cogalora.layer, "STACKED_RANK", 16)
    root = tmp_path / "models"
    labels = [["neg", "pos"], ["x", "y", "z"], ["p", "q"]]
    for index in range(adapters):
        synthetic_checkpoint(root / f"a{index:02d}", str(tiny_base_dir), labels[index % 3], seed=index)
    repository = scanned(root, precision=precision)
    single = Described(Engine(repository, tune_malloc=False))
    gathered = Described(Engine(repository, tune_malloc=False, always_gather=True))
    rng = random.Random(adapters)
    requests = [
        ClassifyRequest(
            texts=[tiny_text(rng.randint(1, 20), seed=i)],
            adapter=f"a{i % adapters:02d}",
            threshold=rng.choice([None, 0.2, 0.5, 0.8]),
        )
        for i in range(max(2 * adapters, 12))
    ]
    alone = [single.classify(request)[0] for request in requests]
    together = gathered.run_batch([row for request in requests for row in prepare(gathered, request)]).results
    gate_patterns = {tuple(result.active_modules) for result in alone}
    assert len(gate_patterns) > 1, "the comparison needs varied gates"
    for expected, result in zip(alone, together, strict=True):
        assert isinstance(result, RowResult)
        if precision == "int8":
            assert bit_pattern(result) == bit_pattern(expected)
            continue
        assert result.active_modules == expected.active_modules
        labels = [item.label for item in expected.scores]
        assert probabilities(result, labels) == pytest.approx(probabilities(expected, labels), abs=1e-5)


def test_router_input_norm_is_per_adapter_in_mixed_batches(tmp_path: Path, tiny_base_dir: Path) -> None:
    """Adapters whose routers standardise their input share batches with adapters whose routers do not:
    each row gets its own adapter's routing, alone, gathered, and as the training model computes it."""
    root = tmp_path / "models"
    synthetic_checkpoint(root / "plain", str(tiny_base_dir), ["neg", "pos"], seed=5)
    synthetic_checkpoint(root / "normed", str(tiny_base_dir), ["neg", "pos"], seed=5, router_input_norm="layer_norm")
    repository = scanned(root)
    single = Described(Engine(repository, tune_malloc=False))
    gathered = Described(Engine(repository, tune_malloc=False, always_gather=True))
    texts = [tiny_text(length, seed=length) for length in (1, 3, 6, 9, 14, 20)]
    requests = [ClassifyRequest(texts=[text], adapter=name) for text in texts for name in ("plain", "normed")]
    alone = [single.classify(request)[0] for request in requests]
    together = gathered.run_batch([row for request in requests for row in prepare(gathered, request)]).results
    for expected, result in zip(alone, together, strict=True):
        assert isinstance(result, RowResult)
        assert result.active_modules == expected.active_modules
        labels = [item.label for item in expected.scores]
        assert probabilities(result, labels) == pytest.approx(probabilities(expected, labels), abs=1e-5)
    # Same weights, only the normalisation differs: the routing must differ somewhere.
    assert any(alone[i].active_modules != alone[i + 1].active_modules for i in range(0, len(alone), 2))
    for name in ("plain", "normed"):
        loaded = load_model(root / name)
        encoded = loaded.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            reference = loaded.model(**encoded)
        results = [result for request, result in zip(requests, alone, strict=True) if request.adapter == name]
        for row, result in enumerate(results):
            on = [
                site for site, gate in zip(loaded.model.site_names, reference.gates[row].tolist(), strict=True) if gate
            ]
            assert result.active_modules == on
            expected = torch.softmax(reference.logits[row], dim=-1).tolist()
            assert probabilities(result, loaded.meta.labels) == pytest.approx(expected, abs=1e-4)


# ---- zero work when off ----------------------------------------------------------------------


@pytest.mark.integration
def test_tau_one_does_no_adapter_work_and_equals_base_plus_head(minilm_engine: Engine, minilm_model_dir: Path) -> None:
    texts = sentences(10)
    rows = []
    for adapter in ("sst2", "agnews"):
        rows += prepare(minilm_engine, ClassifyRequest(texts=texts, adapter=adapter, threshold=1.0))
    outcome = minilm_engine.run_batch(rows)
    assert [stats.adapter_rows_multiplied for stats in outcome.stats] == [0]

    for adapter, results in (("sst2", outcome.results[:10]), ("agnews", outcome.results[10:])):
        meta, weights = read_adapter(minilm_model_dir / adapter)
        plain = load_base_model(PACKAGED_MODEL_ID, num_labels=len(meta.labels))
        with torch.no_grad():
            plain.classifier.weight.copy_(weights.head["classifier"][0])
            plain.classifier.bias.copy_(weights.head["classifier"][1])
        tokenizer = minilm_engine.repository.encoders()[0].tokenizer
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=meta.max_length, return_tensors="pt")
        with torch.inference_mode():
            expected = torch.softmax(plain(**encoded).logits, dim=-1)
        for row, result in enumerate(results):
            assert isinstance(result, RowResult)
            assert result.active_modules == [] and result.active_adapters == 0
            assert result.flops.adapter == 0 and result.flops.adapter_saved > 0
            assert probabilities(result, meta.labels) == pytest.approx(expected[row].tolist(), abs=1e-5)


def test_torch_counts_exactly_the_flops_the_results_report(tiny_engine: Engine) -> None:
    """FlopCounterMode (torch's count, not ours) over a mixed batch of equal-length rows equals the sum of
    the per-row analytic FLOPs: adapter products ran for the active (row, site) pairs and no others.
    (FlopCounterMode does not see CPU scaled-dot-product attention, so that term is left out.)"""
    texts = [tiny_text(6, seed=seed) for seed in range(6)]
    rows = prepare(tiny_engine, ClassifyRequest(texts=texts[:3], adapter="two"))
    rows += prepare(tiny_engine, ClassifyRequest(texts=texts[3:], adapter="three", threshold=0.3))
    assert len({row.tokens for row in rows}) == 1, "equal lengths: no padding in the count"
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        outcome = tiny_engine.run_batch(rows)
    attention = sum(row.adapter.flops.attention_per_token_pair * row.tokens**2 for row in rows)
    reported = sum(map(torch_counted, rows, outcome.results)) - attention
    active = sum(result.active_adapters for result in outcome.results)
    assert 0 < active < 12 * len(rows), "the check needs some gates on and some off"
    per_site = rows[0].adapter.flops.adapter_per_token[0] * rows[0].tokens
    assert counter.get_total_flops() == pytest.approx(reported, abs=per_site / 2), "off by a whole (row, site) pair"
    assert outcome.stats[0].adapter_rows_multiplied == active
    forced_off = tiny_engine.run_batch(prepare(tiny_engine, ClassifyRequest(texts=texts, adapter="two", threshold=1)))
    assert forced_off.stats[0].adapter_rows_multiplied == 0


# ---- results, labels, errors -----------------------------------------------------------------


def test_mixed_label_counts_are_sliced_per_row(tiny_engine: Engine) -> None:
    rows = prepare(tiny_engine, ClassifyRequest(texts=["good movie", "bad plot the"], adapter="two"))
    rows += prepare(tiny_engine, ClassifyRequest(texts=["the plot"], adapter="three", threshold=0.2))
    results = tiny_engine.run_batch(rows).results
    assert [len(result.scores) for result in results] == [2, 2, 3]
    for result in results:
        scores = [item.score for item in result.scores]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-6)
        assert result.label == result.scores[0].label and result.score == scores[0]
        assert result.active_adapters == len(result.active_modules)
        assert result.flops.total > result.flops.adapter
    assert {item.label for item in results[2].scores} == {"x", "y", "z"}


def test_tokenization_limits(tiny_engine: Engine) -> None:
    with pytest.raises(UnknownAdapterError):
        tiny_engine.classify(ClassifyRequest(texts=["good"], adapter="nope"))
    long_text = tiny_text(40)
    with pytest.raises(InputTooLongError, match=r"input 1 has 42 tokens.*16"):
        prepare(tiny_engine, ClassifyRequest(texts=["good", long_text], adapter="two", truncate=False))
    rows = prepare(tiny_engine, ClassifyRequest(texts=["good", long_text], adapter="two"))
    assert [row.tokens for row in rows] == [3, 16]
    assert [row.input_tokens for row in rows] == [3, 42], "the length before truncation is kept"
    assert tiny_engine.classify(ClassifyRequest(texts=[long_text], adapter="two"))[0].tokens == 16


def test_unloaded_adapter_rows_fail_alone_even_when_the_slot_is_reused(
    tiny_engine: Engine, tiny_dir: Path, tiny_base_dir: Path
) -> None:
    repo = tiny_engine.repository
    doomed = prepare(tiny_engine, ClassifyRequest(texts=["good movie"], adapter="two"))
    kept = prepare(tiny_engine, ClassifyRequest(texts=["bad plot"], adapter="three"))
    old_slot = doomed[0].adapter.slot
    repo.unload("two")
    synthetic_checkpoint(tiny_dir / "newcomer", str(tiny_base_dir), ["p", "q"], seed=11)
    repo.load("newcomer")
    assert repo.acquire("newcomer").slot == old_slot, "the freed slot now holds another adapter"
    results = tiny_engine.run_batch(doomed + kept).results
    assert isinstance(results[0], AdapterUnloadedError)
    assert isinstance(results[1], RowResult)


def test_a_failing_row_does_not_fail_its_batch_mates(tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = prepare(tiny_engine, ClassifyRequest(texts=["good movie", "awful plot", "the plot", "bad"], adapter="two"))
    encoder = rows[0].adapter.encoder
    poison = encoder.tokenizer.convert_tokens_to_ids("awful")
    original = encoder.model.forward

    def fragile_forward(input_ids, *args, **kwargs):
        if bool((input_ids == poison).any()):
            raise RuntimeError("simulated kernel failure")
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(encoder.model, "forward", fragile_forward)
    results = tiny_engine.run_batch(rows).results
    assert isinstance(results[1], InferenceError)
    assert all(isinstance(results[i], RowResult) for i in (0, 2, 3))
    monkeypatch.undo()
    clean = tiny_engine.run_batch(rows).results
    for i in (0, 2, 3):
        assert results[i].label == clean[i].label
        assert results[i].score == pytest.approx(clean[i].score, abs=1e-5)


def test_batch_stats(tiny_engine: Engine) -> None:
    rows = prepare(tiny_engine, ClassifyRequest(texts=["good", tiny_text(12)], adapter="two"))
    rows += prepare(tiny_engine, ClassifyRequest(texts=["bad plot"], adapter="three"))
    outcome = tiny_engine.run_batch(rows)
    (stats,) = outcome.stats
    assert stats.rows == 3 and stats.real_tokens == sum(row.tokens for row in rows) == 3 + 14 + 4
    assert stats.forwards >= 1 and stats.padded_tokens >= stats.real_tokens
    assert stats.adapter_rows_multiplied == sum(result.active_adapters for result in outcome.results)
    assert stats.inference_seconds > 0


@pytest.mark.parametrize("precision", ["int8", "float32"])
def test_an_int8_batch_of_many_lengths_runs_in_one_forward_without_padding(tiny_dir: Path, precision: str) -> None:
    """int8 packs its tokens (``cogalora.packing``): cutting a batch by length saves nothing there, so it
    runs whole and pads nothing; float32 pads, and cuts where that saves more than a forward costs."""
    engine = Described(Engine(scanned(tiny_dir, precision=precision), tune_malloc=False, chunk_overhead_tokens=0))
    texts = [tiny_text(words, seed=words) for words in (1, 3, 6, 10, 15, 21)]
    rows = prepare(engine, ClassifyRequest(texts=texts, adapter="two"))
    (stats,) = engine.run_batch(rows).stats
    if precision == "int8":
        assert (stats.forwards, stats.padded_tokens) == (1, stats.real_tokens)
    else:
        assert stats.forwards == len({row.tokens for row in rows}) > 1 and stats.padded_tokens == stats.real_tokens


def test_two_encoders_in_one_batch(tmp_path: Path, tiny_dir: Path, tiny_base_dir: Path) -> None:
    """Adapters on two different base models share a batch: one forward group each, results in order."""
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_base_dir, other_base)
    synthetic_checkpoint(tiny_dir / "elsewhere", str(other_base), ["neg", "pos"], seed=3)
    engine = Described(Engine(scanned(tiny_dir), tune_malloc=False))
    texts = ["good", "bad plot", "the movie"]
    rows = prepare(engine, ClassifyRequest(texts=texts[:2], adapter="two"))
    rows += prepare(engine, ClassifyRequest(texts=texts[2:], adapter="elsewhere"))
    outcome = engine.run_batch(rows)
    assert len(outcome.stats) == 2 and len(engine.repository.encoders()) == 2
    for text, row, result in zip(texts, rows, outcome.results, strict=True):
        alone = engine.classify(ClassifyRequest(texts=[text], adapter=row.adapter.name))[0]
        assert result.active_modules == alone.active_modules
        assert result.score == pytest.approx(alone.score, abs=1e-5)
        assert {item.label for item in result.scores} == set(row.adapter.labels)


# ---- length chunking -------------------------------------------------------------------------


def brute_force_cost(lengths: list[int], overhead: int) -> int:
    best = None
    for cuts in itertools.product([False, True], repeat=len(lengths) - 1):
        cost, start = 0, 0
        for i, cut in enumerate([*cuts, True]):
            if cut:
                cost += lengths[i] * (i + 1 - start) + overhead
                start = i + 1
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_length_chunks_are_optimal_and_cover_every_row(seed: int) -> None:
    rng = random.Random(seed)
    lengths = sorted(rng.randint(2, 40) for _ in range(rng.randint(1, 10)))
    overhead = rng.choice([0, 8, 48, 500])
    chunks = length_chunks(lengths, overhead)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    cost = sum(lengths[stop - 1] * (stop - start) + overhead for start, stop in chunks)
    assert cost == brute_force_cost(lengths, overhead)
    assert length_chunks(lengths, -1) == [(0, len(lengths))]


_ALLOCATOR_PROBE = """
import torch
from service.engine_tuning import release_free_memory, tune_allocator

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

assert tune_allocator()
before = rss_mb()
buffer = torch.ones(200 << 18)  # 200 MB of float32, every page touched
del buffer
kept = rss_mb()
assert release_free_memory()
print(before, kept, rss_mb())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_the_tuned_allocator_keeps_freed_buffers_until_the_engine_releases_them() -> None:
    """In a fresh process (the settings are process-wide): a freed 200 MB buffer stays resident (the next
    forward reuses it without page faults) until ``release_free_memory`` gives it back."""
    probe = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    before, kept, released = (float(value) for value in probe.stdout.split())
    assert kept - before > 150, "the freed buffer stayed with the process"
    assert kept - released > 150, "and went back to the OS when released"


_COLLECTOR_PROBE = """
import gc, weakref
from service.engine_tuning import freeze_startup_objects

class Node:
    pass

kept = Node()
first, second = Node(), Node()
first.other, second.other = second, first  # a reference cycle nothing else holds: garbage
cycle = weakref.ref(first)
del first, second
frozen = freeze_startup_objects()
later = Node()
tracked = gc.get_objects()
print(frozen, cycle() is None, any(o is kept for o in tracked), any(o is later for o in tracked))
"""


def test_freezing_the_startup_objects_collects_garbage_first_and_leaves_later_objects_collectable() -> None:
    """In a fresh process (freezing is process-wide): the objects alive at the call leave the collector's
    generations (full collections no longer walk them), cyclic garbage of that moment is collected rather
    than kept for ever, and objects made afterwards are tracked as before."""
    probe = subprocess.run([sys.executable, "-c", _COLLECTOR_PROBE], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    frozen, cycle_collected, kept_tracked, later_tracked = probe.stdout.split()
    assert int(frozen) > 1000, "the imported modules' objects, at least"
    assert cycle_collected == "True", "garbage at the call is collected, not frozen"
    assert kept_tracked == "False", "an object alive at the call is no longer walked"
    assert later_tracked == "True", "objects made afterwards are collected as before"


# ---- RAD-LoRA: ranks routed per row ------------------------------------------------------------


@pytest.fixture
def rank_routed_engine(tmp_path: Path, tiny_base_dir: Path) -> Engine:
    """A RAD-LoRA adapter (``rad``, ranks 0/2/4/8) beside a CoGaLoRA one (``two``) on one tiny encoder."""
    root = tmp_path / "models"
    synthetic_checkpoint(root / "rad", str(tiny_base_dir), ["neg", "pos"], method="radlora", seed=3)
    synthetic_checkpoint(root / "two", str(tiny_base_dir), ["neg", "pos"], seed=0)
    return Described(Engine(scanned(root), tune_malloc=False))


def test_rank_routed_engine_matches_the_training_model_and_reports_ranks(rank_routed_engine: Engine) -> None:
    texts = [tiny_text(3 + seed % 9, seed=seed) for seed in range(16)]
    loaded = load_model(rank_routed_engine.repository.model_dir / "rad")
    assert loaded.meta.rank_set == [0, 2, 4, 8]
    encoded = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        reference = loaded.model(**encoded)
    assert set(reference.ranks.unique().tolist()) == {0, 2, 4, 8}, "the check needs every rank in use"
    results = rank_routed_engine.classify(ClassifyRequest(texts=texts, adapter="rad"))
    flop_model = rank_routed_engine.repository.acquire("rad").flops
    for row, result in enumerate(results):
        ranks = reference.ranks[row].tolist()
        on = [name for name, rank in zip(loaded.model.site_names, ranks, strict=True) if rank > 0]
        assert result.active_modules == on
        assert result.active_rank == sum(ranks)
        assert probabilities(result, ["neg", "pos"]) == pytest.approx(
            torch.softmax(reference.logits[row], -1).tolist(), abs=1e-4
        )
        expected = flop_model.request(result.tokens, [rank > 0 for rank in ranks], ranks=ranks)
        assert result.flops.adapter == expected.adapter
    assert any(result.active_rank < 8 * result.active_adapters for result in results)


def test_rank_routed_rows_are_batch_invariant_and_counted_exactly(rank_routed_engine: Engine) -> None:
    texts = [tiny_text(6, seed=seed) for seed in range(8)]
    requests = [ClassifyRequest(texts=[text], adapter=("rad", "two")[i % 2]) for i, text in enumerate(texts)]
    alone = [rank_routed_engine.classify(request)[0] for request in requests]
    rows = [row for request in requests for row in prepare(rank_routed_engine, request)]
    assert len({row.tokens for row in rows}) == 1, "equal lengths: no padding in the count"
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        outcome = rank_routed_engine.run_batch(rows)
    for single, in_batch in zip(alone, outcome.results, strict=True):
        assert isinstance(in_batch, RowResult)
        assert (in_batch.active_modules, in_batch.active_rank) == (single.active_modules, single.active_rank)
        assert probabilities(in_batch, ["neg", "pos"]) == pytest.approx(probabilities(single, ["neg", "pos"]), abs=1e-5)
        assert in_batch.flops == single.flops
    # torch's count of the mixed batch equals the per-row analytic FLOPs at the ranks each row used.
    attention = sum(row.adapter.flops.attention_per_token_pair * row.tokens**2 for row in rows)
    reported = sum(map(torch_counted, rows, outcome.results)) - attention
    per_rank = rows[0].adapter.flops.adapter_per_token_rank[0] * rows[0].tokens
    assert counter.get_total_flops() == pytest.approx(reported, abs=per_rank / 2), "off by one rank of one site"


@pytest.mark.integration
def test_every_committed_model_is_served_with_its_ranks() -> None:
    """The committed repository (models/) scans clean and answers on every adapter; RAD-LoRA rows may
    use less than the full rank of their active sites, every other method exactly the full rank."""
    committed = Path(__file__).resolve().parents[1] / "models"
    repository = scanned(committed)
    engine = Described(Engine(repository, tune_malloc=False))
    texts = sentences(4)
    assert "sst2-radlora" in repository.names()
    for name in repository.names():
        meta = repository.info(name)
        results = engine.classify(ClassifyRequest(texts=texts, adapter=name))
        assert [len(result.scores) for result in results] == [len(meta.labels)] * len(texts)
        for result in results:
            assert result.active_rank <= 8 * result.active_adapters
            if meta.method != "radlora":
                assert result.active_rank == 8 * result.active_adapters


# ---- lanes: copies of the model running forwards at once -------------------------------------------


@pytest.mark.integration
def test_lanes_run_forwards_at_once_and_give_the_answers_of_one_lane(mixed_minilm_dir: Path) -> None:
    """Two lanes (two copies of MiniLM, int8) running two batches on two threads: every answer is the bits
    of the same row alone, and an admin unload waits for running forwards, then reaches both copies."""
    from concurrent.futures import ThreadPoolExecutor

    one = Described(Engine(scanned(mixed_minilm_dir, precision="int8"), tune_malloc=False))
    two = Described(Engine(scanned(mixed_minilm_dir, precision="int8", lanes=2), tune_malloc=False))
    texts = sentences(48)
    requests = [ClassifyRequest([text], ("sst2", "rad", "peft")[i % 3]) for i, text in enumerate(texts)]
    alone = [bit_pattern(one.classify(request)[0]) for request in requests]
    rows = [row for request in requests for row in prepare(two, request)]
    assert two.lanes == 2 and len(two.repository.encoders()[0].lanes) == 2
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(two.run_batch, [rows[:24], rows[24:]] * 3))
    for k, outcome in enumerate(outcomes):
        start = 24 * (k % 2)
        assert [bit_pattern(result) for result in outcome.results] == alone[start : start + 24]
    lanes = two.repository.encoders()[0].lanes
    (slot,) = [slot for slot, name in two.repository.encoders()[0].slots.items() if name == "rad"]
    assert all(any(model.site_present(slot)) for model in lanes.models)
    two.repository.unload("rad")
    assert not any(any(model.site_present(slot)) for model in lanes.models), "the unload reached every copy"
