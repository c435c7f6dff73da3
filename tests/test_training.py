"""The training package on tiny random encoders and generated toy data (no real data, no download)."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import bank_row
from transformers import BertTokenizer

from cogalora import load_model, read_meta
from cogalora.base_model import load_tokenizer
from training.calibrate import parse_taus
from training.cli import main
from training.data import (
    Columns,
    DataError,
    EncodedDataset,
    infer_label_names,
    label_indices,
    parse_label_names,
    read_examples,
    training_batches,
)
from training.evaluation import Predictions, never_fired
from training.loop import TrainConfig, build_model
from training.sweep import load_sweep, run_sweep

FILLER = [f"w{i}" for i in range(40)] + ["movie", "plot", "the", "a"]


def toy_rows(count: int, seed: int, label_style: str = "name") -> list[tuple[str, str]]:
    """Separable sentiment: one of good/great (positive) or bad/awful (negative) among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        positive = i % 2 == 0
        words = rng.choices(FILLER, k=rng.randint(2, 10))
        words.insert(rng.randrange(len(words) + 1), rng.choice(["good", "great"] if positive else ["bad", "awful"]))
        label = ("positive" if positive else "negative") if label_style == "name" else str(int(positive))
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("sentence", "label")) -> Path:
    lines = ["\t".join(header)] + [f"{text}\t{label}" for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_base(tiny_base_dir: Path) -> Path:
    """``tiny_base_dir`` with a working tokenizer.

    conftest builds it with ``BertTokenizerFast(vocab_file=...)``, which transformers 5 ignores: the
    saved tokenizer knows only the special tokens and maps every word to [UNK]. ``vocab=`` works.
    """
    BertTokenizer(vocab=str(tiny_base_dir / "vocab.txt"), do_lower_case=True).save_pretrained(tiny_base_dir)
    ids = load_tokenizer(str(tiny_base_dir))("good w3")["input_ids"]
    assert ids[1:3] == [65, 8], ids
    return tiny_base_dir


@pytest.fixture
def toy_data(tmp_path: Path) -> tuple[Path, Path]:
    train = write_tsv(tmp_path / "train.tsv", toy_rows(192, seed=1, label_style="index"))
    dev = write_tsv(tmp_path / "dev.tsv", toy_rows(60, seed=2, label_style="index"))
    return train, dev


def train_argv(base: Path, train: Path, dev: Path, output: Path, method: str = "cogalora", *extra: str) -> list[str]:
    return [
        "train",
        "--train", str(train),
        "--dev", str(dev),
        "--output", str(output),
        "--base-model", str(base),
        "--method", method,
        "--label-names", "negative,positive",
        "--rank", "4",
        "--lr", "1e-2",
        "--router-lr", "1e-2",
        "--epochs", "3",
        "--batch-size", "8",
        "--max-length", "16",
        "--threads", "1",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# ---- data ---------------------------------------------------------------------------------------


def test_labels_may_be_names_or_indices(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "mixed.tsv", [("good movie", "positive"), ("bad plot", "0"), ("great", "1")])
    examples = read_examples(path)
    assert label_indices(examples, ["negative", "positive"], str(path)) == [1, 0, 1]


def test_names_win_over_indices_and_defaults_are_sorted_unique(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "digits.tsv", [("a", "1"), ("b", "0"), ("c", "1")])
    examples = read_examples(path)
    names = infer_label_names(examples)
    assert names == ["0", "1"]
    # With the names "1","0" (reversed), the label "1" means the *name* "1", index 0.
    assert label_indices(examples, ["1", "0"], "x") == [0, 1, 0]


def test_bad_label_names_file_and_line(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "bad.tsv", [("good", "positive"), ("meh", "neutral")])
    with pytest.raises(DataError, match=r"bad\.tsv:3: label 'neutral' is neither one of"):
        label_indices(read_examples(path), ["negative", "positive"], str(path))
    with pytest.raises(DataError, match=r"index 0\.\.1"):
        label_indices(read_examples(write_tsv(tmp_path / "b.tsv", [("x", "2")])), ["n", "p"], "b.tsv")


@pytest.mark.parametrize("text", ["solo", "a,,b", "a,a"])
def test_label_names_option_is_validated(text: str) -> None:
    with pytest.raises(DataError, match="--label-names"):
        parse_label_names(text)


def test_one_label_only_is_an_error(tmp_path: Path) -> None:
    path = write_tsv(tmp_path / "one.tsv", [("good", "positive"), ("great", "positive")])
    with pytest.raises(DataError, match="at least two distinct labels"):
        infer_label_names(read_examples(path))


def test_csv_reader_with_quotes_and_named_columns(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "review"])
        writer.writerow(["1", "pos", 'good, "really" good'])
        writer.writerow(["2", "neg", "bad"])
    examples = read_examples(path, Columns(text="review", label="label"))
    assert [(e.text, e.label) for e in examples] == [('good, "really" good', "pos"), ("bad", "neg")]
    # No column named text/sentence and two candidates left: an error that says which flag to use, no guess.
    with pytest.raises(DataError, match=r"has no text column \(text/sentence\); name it with --text-column"):
        read_examples(path)
    assert [e.text for e in read_examples(path, Columns(text="review"))] == ['good, "really" good', "bad"]
    with pytest.raises(DataError, match=r"no text column 'body'; the header has \['id', 'label', 'review'\]"):
        read_examples(path, Columns(text="body"))


def test_jsonl_reader_and_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": "negative"}\n', encoding="utf-8")
    assert [(e.text, e.label, e.line) for e in read_examples(path)] == [("good", "1", 1), ("bad", "negative", 3)]
    custom = tmp_path / "custom.jsonl"
    custom.write_text('{"body": "good", "y": "p"}\n', encoding="utf-8")
    assert read_examples(custom, Columns("body", "y"))[0].label == "p"
    with pytest.raises(DataError, match=r"custom\.jsonl:1: no key 'text'"):
        read_examples(custom)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 0}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        read_examples(broken)


def test_ragged_tsv_and_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "ragged.tsv"
    path.write_text("sentence\tlabel\ngood\t1\nbad\t0\textra\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged\.tsv:3: expected 2 fields"):
        read_examples(path)
    with pytest.raises(DataError, match="unknown format"):
        read_examples(write_tsv(tmp_path / "data.txt", [("a", "b")]))
    with pytest.raises(DataError, match="file not found"):
        read_examples(tmp_path / "missing.tsv")


def test_training_batches_cover_everything_once_grouped_and_deterministic() -> None:
    rng = random.Random(0)
    dataset = EncodedDataset([[1] * rng.randint(1, 40) for _ in range(500)], [0] * 500, pad_token_id=0)
    batches = training_batches(dataset, batch_size=16, seed=3, bucket_batches=4)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert batches == training_batches(dataset, batch_size=16, seed=3, bucket_batches=4)
    assert batches != training_batches(dataset, batch_size=16, seed=4, bucket_batches=4)
    lengths = dataset.lengths()
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10  # random batches of lengths 1..40 would spread ~35


def test_never_fired_ignores_absent_sites() -> None:
    gates = torch.tensor([[True, False, False], [False, False, False]])
    predictions = Predictions(torch.zeros(2), gates, gates.float(), torch.ones(2), gates.long() * 8)
    assert never_fired(predictions, [True, True, False]) == [1]


# ---- training, evaluation, calibration, sweeps ---------------------------------------------------


def test_cli_trains_radlora_and_evaluate_reports_the_rank_each_example_used(
    tiny_base: Path, toy_data, tmp_path: Path, capsys
) -> None:
    train, dev = toy_data
    output = tmp_path / "rad"
    extra = ("--rank-set", "0,2,4", "--rank-lambda", "0.5", "--lambda", "0.01", "--rank-warmup", "sampled")
    assert main(train_argv(tiny_base, train, dev, output, "radlora", *extra, "--warmup-gates-on-steps", "1")) == 0
    meta = read_meta(output)
    assert (meta.method, meta.rank, meta.rank_set, meta.rank_lambda) == ("radlora", 4, [0, 2, 4], 0.5)
    assert meta.training["rank_warmup"] == "sampled"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(output), "--data", str(dev), "--json", "--threads", "1"]) == 0
    result = last_json(capsys.readouterr().out)
    loaded = load_model(output)
    rows = list(csv.reader(dev.open(encoding="utf-8"), delimiter="\t"))[1:]
    total_rank = 0
    for text, _label in rows:
        encoded = loaded.tokenizer(text, truncation=True, max_length=16, return_tensors="pt")
        out = loaded.model(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"])
        assert set(out.ranks.unique().tolist()) <= {0, 2, 4}
        total_rank += int(out.ranks.sum())
    assert result["mean_active_rank"] == pytest.approx(total_rank / len(rows), abs=1e-5)
    assert result["mean_active_rank"] <= 4 * result["mean_active_adapters"] + 1e-6
    assert main(train_argv(tiny_base, train, dev, tmp_path / "bad", "radlora", "--rank-set", "0,8")) == 2
    assert "--rank-set" in capsys.readouterr().err


def test_cli_trains_hyperlora_with_its_scale_generators_at_the_adapter_learning_rate(
    tiny_base: Path, toy_data, tmp_path: Path, capsys
) -> None:
    train, dev = toy_data
    output = tmp_path / "hyper"
    argv = train_argv(tiny_base, train, dev, output, "hyperlora", "--lambda", "0.01", "--warmup-gates-on-steps", "1")
    assert main(argv) == 0
    meta = read_meta(output)
    assert meta.method == "hyperlora" and meta.router is not None
    loaded = load_model(output)
    scales = [layer.banks[0].router_scale_w for layer in loaded.model.layers if layer.banks]
    assert scales and any(float(weight.abs().sum()) > 0 for weight in scales)  # trained away from the init 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(output), "--data", str(dev), "--json", "--threads", "1"]) == 0
    result = last_json(capsys.readouterr().out)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["mean_active_adapters"] >= 0


def test_cli_train_then_evaluate_json(tiny_base: Path, toy_data, tmp_path: Path, capsys) -> None:
    train, dev = toy_data
    output = tmp_path / "model"
    assert main(train_argv(tiny_base, train, dev, output, "cogalora", "--lambda", "0.01")) == 0
    meta = read_meta(output)
    assert meta.method == "cogalora" and meta.labels == ["negative", "positive"]
    assert meta.base_model == str(tiny_base) and meta.router is not None and meta.training["lr"] == 1e-2
    for key in ("accuracy", "mean_active_fraction", "mean_flops", "per_module_activation_rate", "train_seconds"):
        assert key in meta.metrics
    capsys.readouterr()

    assert main(["evaluate", "--model", str(output), "--data", str(dev), "--json", "--threads", "1"]) == 0
    result = last_json(capsys.readouterr().out)
    for key in ("accuracy", "examples", "mean_active_adapters", "mean_active_fraction", "mean_flops"):
        assert key in result
    assert result["examples"] == 60
    assert 0.0 <= result["mean_active_fraction"] <= 1.0
    assert result["accuracy"] > 0.8  # an easy, separable toy task: far above chance after 72 steps
    assert result["mean_adapter_flops"] <= result["mean_flops"]

    # Recompute accuracy and active adapters one example at a time, independently of the batching.
    loaded = load_model(output)
    rows = list(csv.reader(dev.open(encoding="utf-8"), delimiter="\t"))[1:]
    correct, active = 0, 0
    for text, label in rows:
        encoded = loaded.tokenizer(text, truncation=True, max_length=16, return_tensors="pt")
        out = loaded.model(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"])
        correct += int(out.logits.argmax(dim=1).item() == int(label))
        active += int(out.gates.sum())
    assert result["accuracy"] == pytest.approx(correct / len(rows), abs=1e-6)
    assert result["mean_active_adapters"] == pytest.approx(active / len(rows), abs=1e-5)
    assert result["mean_active_rank"] == pytest.approx(4 * result["mean_active_adapters"], abs=1e-4)

    # --dtype: the same data in bfloat16, compared with float32 on the same rows.
    assert main(["evaluate", "--model", str(output), "--data", str(dev), "--json", "--dtype", "bfloat16"]) == 0
    half = last_json(capsys.readouterr().out)
    assert half["dtype"] == "bfloat16" and result["dtype"] == "float32"
    assert half["accuracy_float32"] == result["accuracy"]
    assert 0.0 <= half["gates_differing_fraction"] <= 1.0
    assert half["gates_differing"] == round(half["gates_differing_fraction"] * 60 * result["total_adapters"])
    assert abs(half["accuracy"] - result["accuracy"]) <= half["labels_differing"] / 60 + 1e-6

    # Without --json: a table first, the JSON object still last.
    assert main(["evaluate", "--model", str(output), "--data", str(dev), "--tau", "1.0"]) == 0
    text = capsys.readouterr().out
    assert "active fraction" in text
    assert last_json(text)["mean_active_adapters"] == 0.0  # p > 1 never holds: every gate off


def test_train_flags_are_the_config_fields_with_their_defaults(tmp_path: Path, capsys) -> None:
    from dataclasses import fields

    from training.cli import build_parser

    required = ["train", "--train", "t.tsv", "--dev", "d.tsv", "--output", "out"]
    args = build_parser().parse_args(required)
    parsed = TrainConfig(**{item.name: getattr(args, item.name) for item in fields(TrainConfig)})
    assert parsed == TrainConfig(train="t.tsv", dev="d.tsv", output="out")
    args = build_parser().parse_args([*required, "--lambda", "0.3", "--keep-never-fired", "--no-progress"])
    assert (args.sparsity_lambda, args.drop_never_fired, args.progress) == (0.3, False, False)
    args = build_parser().parse_args([*required, "--target-active-fraction", "0.25", "--sparsity-weights", "flops"])
    assert (args.target_active_fraction, args.sparsity_weights) == (0.25, "flops")
    with pytest.raises(SystemExit):
        build_parser().parse_args([*required, "--gate-estimator", "bogus"])
    capsys.readouterr()
    # Ranges are checked by the config itself, reported as a CLI error naming the option.
    assert main([*required, "--target-active-fraction", "1.5"]) == 2
    assert "--target-active-fraction must lie in (0, 1]" in capsys.readouterr().err
    assert main([*required, "--method", "lora", "--target-active-fraction", "0.3"]) == 2
    assert "needs --method cogalora" in capsys.readouterr().err


def test_a_run_whose_loss_stops_being_finite_stops_with_a_clear_error_and_saves_nothing(
    tiny_base: Path, toy_data, tmp_path: Path, capsys
) -> None:
    train, dev = toy_data
    output = tmp_path / "model"
    argv = train_argv(tiny_base, train, dev, output, "lora", "--epochs", "1")
    argv[argv.index("--lr") + 1] = "1e30"  # each step moves the weights by ~1e30: logits overflow
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert re.search(r"the training loss became (nan|inf|-inf) at step \d+ \(epoch 1\)", error), error
    assert "Lower the learning rate (--lr, now 1e+30)" in error
    assert not output.exists() or not any(output.iterdir())


def test_training_is_deterministic_given_the_seed(tiny_base: Path, toy_data, tmp_path: Path) -> None:
    train, dev = toy_data
    for name in ("a", "b"):
        argv = train_argv(tiny_base, train, dev, tmp_path / name, "cogalora", "--epochs", "1")
        assert main([*argv, "--keep-never-fired"]) == 0
    a, b = (load_model(tmp_path / name).model.adapter_weights() for name in ("a", "b"))
    assert sorted(a.lora) == sorted(b.lora)
    for path in a.lora:
        assert torch.equal(a.lora[path][1], b.lora[path][1])
        assert torch.equal(a.routers[path].w1, b.routers[path].w1)


@pytest.mark.parametrize(("method", "fraction"), [("full", 0.0), ("lora", 1.0)])
def test_baselines_report_consistent_active_counts(
    method: str, fraction: float, tiny_base: Path, toy_data, tmp_path: Path, capsys
) -> None:
    train, dev = toy_data
    output = tmp_path / method
    assert main(train_argv(tiny_base, train, dev, output, method, "--epochs", "1", "--lr", "1e-3")) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(output), "--data", str(dev), "--json"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["method"] == method
    assert result["mean_active_fraction"] == fraction
    assert result["total_adapters"] == (0 if method == "full" else 12)


def test_galora_is_finalized_and_prunes_with_strong_penalty(tiny_base: Path, toy_data, tmp_path: Path) -> None:
    train, dev = toy_data
    output = tmp_path / "galora"
    argv = train_argv(tiny_base, train, dev, output, "galora", "--lambda", "50", "--router-lr", "0.2")
    assert main(argv) == 0
    meta = read_meta(output)
    assert meta.metrics["dropped_sites"], "a huge L1 penalty with a fast gate LR should prune some modules"
    assert len(meta.sites) == 12 - len(meta.metrics["dropped_sites"])
    assert load_model(output).model.site_present().count(True) == len(meta.sites)


def test_warmup_forces_gates_on_without_touching_routers(tiny_base: Path, toy_data, tmp_path: Path) -> None:
    train, dev = toy_data
    config = TrainConfig(train=str(train), dev=str(dev), output="", base_model=str(tiny_base), rank=4)
    model = build_model(config, ["negative", "positive"])
    ids = torch.randint(5, 40, (8, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for site in range(len(model.sites)):
            bank, row = bank_row(model, site)
            bank.router_b2[row].fill_(-10.0)  # routers say "off"
    model.train()
    out = model(ids, mask, force_gates="on")
    assert bool(out.gates.all())
    out.logits.sum().backward()
    banks = [bank_row(model, site)[0] for site in range(len(model.sites))]
    assert all(bank.router_w1.grad is None or not bank.router_w1.grad.any() for bank in banks)
    assert any(bank.lora_B.grad is not None and bank.lora_B.grad.any() for bank in banks)  # fresh LoRA: B = 0
    assert all(model.site_routed())
    model.eval()
    assert not bool(model(ids, mask).gates.any())


def test_calibrate_writes_a_tau_meeting_the_target(tiny_base: Path, toy_data, tmp_path: Path, capsys) -> None:
    train, dev = toy_data
    output = tmp_path / "model"
    assert main(train_argv(tiny_base, train, dev, output, "cogalora", "--lambda", "0.0", "--epochs", "1")) == 0
    capsys.readouterr()
    # The budget: the sparsest tau of the grid at which some adapter still runs (a tau that switches every
    # adapter off is never picked), so the budget binds.
    probe = ["calibrate", "--model", str(output), "--data", str(dev), "--step", "0.1", "--dry-run", "--json"]
    assert main([*probe, "--target-active-fraction", "1", "--no-progress"]) == 0
    curve = last_json(capsys.readouterr().out)["points"]
    target = min(p["active_fraction"] for p in curve if p["mean_active_adapters"] > 0)
    assert target < 1.0, "the toy model's routers must switch something off somewhere on the grid"
    code = main(
        [
            "calibrate",
            "--model",
            str(output),
            "--data",
            str(dev),
            "--target-active-fraction",
            str(target),
            "--step",
            "0.1",
        ]
    )
    assert code == 0
    payload = last_json(capsys.readouterr().out)
    chosen = payload["chosen"]
    assert payload["written"] and 0 < chosen["active_fraction"] <= target
    feasible = [p["accuracy"] for p in payload["points"] if 0 < p["active_fraction"] <= target]
    assert chosen["accuracy"] == max(feasible)
    assert read_meta(output).tau == chosen["tau"]
    assert "per_module_activation_rate" not in chosen, "the per-site rates go into cogalora.json, not the output"
    assert main(["evaluate", "--model", str(output), "--data", str(dev), "--json"]) == 0
    evaluated = last_json(capsys.readouterr().out)
    assert evaluated["mean_active_fraction"] <= target + 1e-6
    # The routing-drift reference: the chosen tau's per-site rates, as evaluate measures them there.
    reference = read_meta(output).activation_reference()
    assert reference is not None and set(reference) == set(evaluated["per_module_activation_rate"])
    assert list(reference.values()) == pytest.approx(list(evaluated["per_module_activation_rate"].values()))

    # --pick budget: the lowest tau within the budget, whatever the accuracies (no labels needed).
    limit = max(target, 0.5)
    budget_argv = ["calibrate", "--model", str(output), "--data", str(dev), "--target-active-fraction", str(limit)]
    assert main([*budget_argv, "--step", "0.1", "--pick", "budget", "--dry-run", "--json"]) == 0
    budget = last_json(capsys.readouterr().out)
    within = [p["tau"] for p in budget["points"] if 0 < p["active_fraction"] <= limit]
    assert budget["chosen"]["tau"] == min(within) and budget["pick"] == "budget" and not budget["written"]
    assert read_meta(output).tau == chosen["tau"], "a dry run writes nothing"

    code = main(["calibrate", "--model", str(output), "--data", str(dev), "--target-active-fraction", "-0.1"])
    assert code == 2
    # An explicit candidate list; none of them can meet an impossible target: nothing is written.
    argv = ["calibrate", "--model", str(output), "--data", str(dev), "--taus", "0.0,0.1", "--json"]
    assert main([*argv, "--target-active-fraction", "0.0"]) == 1
    payload = last_json(capsys.readouterr().out)
    assert [p["tau"] for p in payload["points"]] == [0.0, 0.1] and not payload["written"]
    assert read_meta(output).tau == chosen["tau"]


def test_cli_reports_bad_labels_clearly(tiny_base: Path, tmp_path: Path, capsys) -> None:
    train = write_tsv(tmp_path / "train.tsv", [("good", "positive"), ("bad", "negative"), ("meh", "5")])
    argv = train_argv(tiny_base, train, train, tmp_path / "out", "lora")
    assert main(argv) == 2
    assert "label '5' is neither one of ['negative', 'positive']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_is_resumable(tiny_base: Path, toy_data, tmp_path: Path) -> None:
    train, dev = toy_data
    config = {
        "output": str(tmp_path / "sweep"),
        "common": {
            "train": str(train),
            "dev": str(dev),
            "base_model": str(tiny_base),
            "label_names": "negative,positive",
            "rank": 4,
            "max_length": 16,
            "max_train_examples": 64,
            "batch_size": 16,
            "threads": 1,
        },
        "runs": [{"name": "lora", "method": "lora"}, {"name": "co", "method": "cogalora", "lambda": 0.5}],
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    output, rows, skipped = run_sweep(path, progress=False)
    assert skipped == [] and [row["name"] for row in rows] == ["lora", "co"]
    assert rows[0]["mean_active_fraction"] == 1.0
    for name in ("results.csv", "results.md", "tradeoff.png"):
        assert (output / name).stat().st_size > 0
    stamp = (output / "lora" / "adapter_model.safetensors").stat().st_mtime_ns

    _, rows_again, skipped = run_sweep(path, progress=False)
    assert skipped == ["lora", "co"]
    assert rows_again == rows
    assert (output / "lora" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    with (output / "results.csv").open(encoding="utf-8") as handle:
        assert [row["name"] for row in csv.DictReader(handle)] == ["lora", "co"]


def test_plot_reads_evaluate_results_and_names_bad_files(tmp_path: Path, capsys) -> None:
    points = []
    for name, accuracy, active in (("lora", 0.88, 36.0), ("routed", 0.87, 9.5)):
        path = tmp_path / f"{name}.json"
        result = {"method": "lora" if name == "lora" else "cogalora", "accuracy": accuracy, "mean_adapter_flops": 1e6}
        path.write_text("table line\n" + json.dumps(result | {"mean_active_adapters": active}))
        points.append(f"{name}={path}")
    curve = {"points": [{"tau": tau, "accuracy": 0.86, "mean_active_adapters": 9.0 - 4 * tau} for tau in (0.3, 0.7)]}
    (tmp_path / "taus.json").write_text(json.dumps(curve))
    output = tmp_path / "plots" / "tradeoff.png"
    assert main(["plot", *points, f"routed, by tau={tmp_path / 'taus.json'}", "--output", str(output)]) == 2
    assert "taus.json: missing mean_adapter_flops" in capsys.readouterr().err
    for point in curve["points"]:
        point["mean_adapter_flops"] = 5e5
    (tmp_path / "taus.json").write_text(json.dumps(curve))
    assert main(["plot", *points, f"routed, by tau={tmp_path / 'taus.json'}", "--output", str(output)]) == 0
    assert output.read_bytes().startswith(b"\x89PNG") and output.stat().st_size > 10_000
    capsys.readouterr()
    (tmp_path / "bad.json").write_text(json.dumps({"accuracy": 0.5}))
    assert main(["plot", str(tmp_path / "bad.json"), "--output", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert "bad.json: missing mean_active_adapters, mean_adapter_flops, method" in error
    assert not (tmp_path / "x.png").exists()


def test_sweep_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"output": "x", "runs": [{"name": "a", "method": "lora", "bogus": 1}]}))
    with pytest.raises(ValueError, match=r"runs\[0\]: unknown settings \['bogus'\]"):
        load_sweep(path)
    path.write_text(json.dumps({"output": "x", "runs": [{"name": "a", "method": "lora"}]}))
    with pytest.raises(ValueError, match="has no 'train'"):
        load_sweep(path)


def test_parse_taus_validates_and_sorts() -> None:
    assert parse_taus("0.9, 0.8,0.85,0.8") == [0.8, 0.85, 0.9]
    with pytest.raises(DataError, match="in \\[0, 1\\]"):
        parse_taus("0.5,1.5")
    with pytest.raises(DataError, match="comma-separated numbers"):
        parse_taus("0.5,high")


# ---- data-parallel training (torchrun) -----------------------------------------------------------


def test_shards_of_a_global_batch_cover_it_once_in_order() -> None:
    from training.distributed import DistributedContext

    for size in (0, 1, 7, 8, 9):
        indices = list(range(100, 100 + size))
        shards = [DistributedContext(rank, 3).shard(indices) for rank in range(3)]
        assert [i for shard in shards for i in shard] == indices
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.integration
def test_two_processes_under_torchrun_train_like_one_with_the_same_global_batch(
    tiny_base: Path, toy_data, tmp_path: Path
) -> None:
    """2 gloo processes x 4 rows == 1 process x 8 rows; only rank 0 reports and writes the checkpoint.

    Tolerance: the runs differ only in float32 rounding: each rank sums the gradient of its own 4 rows
    (other matmul shapes, its own padding, masked out) and all_reduce adds the halves, ~1e-7 relative
    per step. Training at lr 1e-2 does not damp such perturbations: after 48 steps the largest weight
    differs by 1.0e-5 (measured; weights ~0.1-0.3). 1e-4 leaves a margin of 10, while the mistake the
    test guards against, ranks stepping on their own 4 rows without summing, differs by more than 1e-2
    (the control run below, one process with batch 4, checks that this tolerance would catch it).
    """
    import subprocess
    import sys

    train, dev = toy_data
    common = ("--epochs", "2", "--keep-never-fired")
    assert main([*train_argv(tiny_base, train, dev, tmp_path / "one", "lora"), *common]) == 0
    assert main([*train_argv(tiny_base, train, dev, tmp_path / "half", "lora"), *common, "--batch-size", "4"]) == 0
    logs = tmp_path / "logs"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--log-dir", str(logs), "--tee", "3", "-m", "training",
        *train_argv(tiny_base, train, dev, tmp_path / "two", "lora"), *common,
    ]  # fmt: skip
    for attempt in range(2):
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        # A rank can be aborted inside torch's C++ runtime ("terminate called without an active exception",
        # SIGABRT: a thread object destroyed while its thread runs; seen once, in a full CI run on 2 cores).
        # That crash, and only that one, is not this test's subject: the run is made once more from scratch.
        if done.returncode == 0 or attempt or "terminate called without an active exception" not in done.stderr:
            break
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-4000:]

    one, two, half = (load_model(tmp_path / name).model.adapter_weights() for name in ("one", "two", "half"))

    def largest_difference(a, b) -> float:
        assert sorted(a.lora) == sorted(b.lora) and a.lora
        pairs = [pair for path in a.lora for pair in zip(a.lora[path], b.lora[path], strict=True)]
        return max(float((x - y).abs().max()) for x, y in pairs)

    assert largest_difference(one, two) < 1e-4
    assert largest_difference(one, half) > 1e-2  # the control: a wrong global batch is far outside the tolerance
    assert read_meta(tmp_path / "two").metrics["processes"] == 2
    stdout = {path.parent.name: path.read_text() for path in logs.rglob("stdout.log")}
    assert sorted(stdout) == ["0", "1"]
    assert "saved" in stdout["0"] and "saved" not in stdout["1"]
    assert '"epoch": 1' in stdout["0"] and '"epoch"' not in stdout["1"]
