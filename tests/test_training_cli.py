"""What a user of ``python -m training`` meets: columns found by name, refusals, warnings, progress, several
models in one ``evaluate``, rank budgets in ``calibrate`` (tiny random encoders, toy data)."""

from __future__ import annotations

import logging
import os
import statistics
import tomllib
from pathlib import Path

import pytest
from test_training import last_json, tiny_base, toy_data, toy_rows, train_argv, write_tsv

from cogalora import read_meta, update_meta
from training.cli import main
from training.data import Columns, DataError, read_examples
from training.loop import TrainConfig

__all__ = ["tiny_base", "toy_data"]  # fixtures shared with test_training

ROOT = Path(__file__).resolve().parents[1]


def quick_train(base: Path, toy_data, output: Path, method: str = "cogalora", *extra: str) -> list[str]:
    train, dev = toy_data
    return [*train_argv(base, train, dev, output, method, *extra), "--epochs", "1", "--max-train-examples", "48"]


# ---- columns by name ------------------------------------------------------------------------------


def test_columns_are_found_by_header_name_and_a_reordered_header_is_reported(tmp_path: Path, caplog) -> None:
    rows = [("good movie", "1"), ("bad plot", "0"), ("great", "1")]
    swapped = write_tsv(tmp_path / "swapped.tsv", [(label, text) for text, label in rows], header=("label", "text"))
    with caplog.at_level(logging.WARNING, logger="training"):
        examples = read_examples(swapped)
    assert [(e.text, e.label) for e in examples] == rows
    assert "does not put the text first" in caplog.text and "'text' (column 2)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training"):
        plain = read_examples(write_tsv(tmp_path / "plain.tsv", rows, header=("sentence", "label")))
    assert [(e.text, e.label) for e in plain] == rows and caplog.text == ""


def test_a_file_without_a_header_is_read_by_position_from_its_first_row(tmp_path: Path, caplog) -> None:
    rows = [("good movie", "1"), ("bad plot", "0"), ("great", "1"), ("awful", "0")]
    path = tmp_path / "bare.tsv"
    path.write_text("".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="training"):
        examples = read_examples(path)
    assert [(e.text, e.label, e.line) for e in examples] == [(t, lab, i) for i, (t, lab) in enumerate(rows, 1)]
    assert "no header line" in caplog.text
    with pytest.raises(DataError, match="no header line"):
        read_examples(path, Columns(text="review"))


def test_headers_that_name_no_or_several_columns(tmp_path: Path, caplog) -> None:
    rows = [("good movie", "1"), ("bad plot", "0"), ("great", "1")]
    with caplog.at_level(logging.WARNING, logger="training"):
        unnamed = read_examples(write_tsv(tmp_path / "unnamed.tsv", rows, header=("review", "sentiment")))
    assert [(e.text, e.label) for e in unnamed] == rows and "by position" in caplog.text
    three = tmp_path / "three.tsv"
    three.write_text("id\treview\tsentiment\n1\tgood\t1\n2\tbad\t0\n", encoding="utf-8")
    with pytest.raises(DataError, match="--text-column and --label-column"):
        read_examples(three)
    assert [e.text for e in read_examples(three, Columns("review", "sentiment"))] == ["good", "bad"]
    both = tmp_path / "both.tsv"
    both.write_text("text\tsentence\tlabel\na\tb\t1\nc\td\t0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"several text columns .* --text-column"):
        read_examples(both)
    assert [e.text for e in read_examples(both, Columns(text="sentence"))] == ["b", "d"]


def test_training_on_a_label_first_file_learns_the_two_labels_not_the_texts(
    tiny_base: Path, toy_data, tmp_path: Path, capsys
) -> None:
    _, dev = toy_data
    swapped = write_tsv(tmp_path / "swapped.tsv", [(b, a) for a, b in toy_rows(48, seed=3)], header=("label", "text"))
    argv = [*train_argv(tiny_base, swapped, dev, tmp_path / "out", "lora"), "--epochs", "1"]
    argv[argv.index("--label-names") : argv.index("--label-names") + 2] = []  # labels inferred from the file
    assert main(argv) == 0
    assert read_meta(tmp_path / "out").labels == ["negative", "positive"]
    assert "does not put the text first" in capsys.readouterr().err


# ---- train: overwrite, ignored flags, file modes ------------------------------------------------------------


def test_train_refuses_to_replace_a_checkpoint_without_overwrite(tiny_base: Path, toy_data, tmp_path: Path, capsys):
    output = tmp_path / "model"
    previous = os.umask(0o022)
    try:
        assert main(quick_train(tiny_base, toy_data, output)) == 0
    finally:
        os.umask(previous)
    # Every file of the checkpoint readable by the service's user (safetensors' own writer makes 0600 files).
    modes = {path.name: path.stat().st_mode & 0o777 for path in output.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    update_meta(output, tau=0.7, calibration={"target_active_fraction": 0.3})
    stamp = (output / "adapter_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(quick_train(tiny_base, toy_data, output)) == 2
    error = capsys.readouterr().err
    assert "already holds a cogalora checkpoint, calibrated to tau 0.7" in error and "--overwrite" in error
    assert (output / "adapter_model.safetensors").stat().st_mtime_ns == stamp and read_meta(output).tau == 0.7
    assert main([*quick_train(tiny_base, toy_data, output), "--overwrite"]) == 0
    assert read_meta(output).tau == 0.5, "replaced by the new run"


def test_flags_the_method_does_not_use_are_named_in_a_warning(tiny_base: Path, toy_data, tmp_path: Path, capsys):
    def config(method: str, **options) -> TrainConfig:
        return TrainConfig(train="t", dev="d", output="o", method=method, **options)

    assert config("lora", sparsity_lambda=0.3, router_lr=1e-2).ignored_options() == ["--lambda", "--router-lr"]
    assert config("lora", drop_never_fired=False).ignored_options() == ["--keep-never-fired"]
    assert config("cogalora", sparsity_lambda=0.3, rank_lambda=0.5).ignored_options() == ["--rank-lambda"]
    assert config("galora", sparsity_lambda=0.3, router_lr=1e-2).ignored_options() == []
    assert config("full", rank=4).ignored_options() == ["--rank"]
    assert config("radlora", rank_lambda=0.5, target_active_rank=12.0).ignored_options() == []
    assert main(quick_train(tiny_base, toy_data, tmp_path / "lora", "lora", "--lambda", "0.3")) == 0
    # (train_argv also sets --router-lr: no routers in plain LoRA either)
    assert "warning: --method lora does not use --lambda, --router-lr: ignored" in capsys.readouterr().err
    assert main(quick_train(tiny_base, toy_data, tmp_path / "co", "cogalora", "--lambda", "0.3")) == 0
    assert "does not use" not in capsys.readouterr().err


def test_the_rank_budget_is_a_radlora_option(tmp_path: Path, capsys) -> None:
    args = ["train", "--train", "t.tsv", "--dev", "d.tsv", "--output", str(tmp_path / "x")]
    assert main([*args, "--method", "cogalora", "--target-active-rank", "24"]) == 2
    assert "--target-active-rank needs --method radlora" in capsys.readouterr().err
    assert main([*args, "--method", "radlora", "--target-active-rank", "0"]) == 2
    assert "must be > 0" in capsys.readouterr().err


# ---- evaluate and calibrate ------------------------------------------------------------------------------


def test_evaluate_compares_several_models_with_mean_and_sd_per_name(tiny_base: Path, toy_data, tmp_path, capsys):
    _, dev = toy_data
    for seed in (0, 1):
        assert main([*quick_train(tiny_base, toy_data, tmp_path / f"co{seed}", "cogalora"), "--seed", str(seed)]) == 0
    assert main(quick_train(tiny_base, toy_data, tmp_path / "lora", "lora")) == 0
    capsys.readouterr()
    models = [f"routed={tmp_path / 'co0'}", f"routed={tmp_path / 'co1'}", str(tmp_path / "lora")]
    assert main(["evaluate", "--model", *models, "--data", str(dev), "--no-progress"]) == 0
    out = capsys.readouterr().out
    result = last_json(out)
    assert [m["name"] for m in result["models"]] == ["routed", "routed", str(tmp_path / "lora")]
    singles = []
    for model in result["models"]:
        assert main(["evaluate", "--model", model["model"], "--data", str(dev), "--json", "--no-progress"]) == 0
        single = last_json(capsys.readouterr().out)
        assert model["accuracy"] == single["accuracy"] and model["mean_active_rank"] == single["mean_active_rank"]
        singles.append(single)
    (group,) = result["groups"]
    accuracies = [singles[0]["accuracy"], singles[1]["accuracy"]]
    assert group["name"] == "routed" and group["runs"] == 2
    assert group["accuracy_mean"] == pytest.approx(statistics.fmean(accuracies))
    assert group["accuracy_sd"] == pytest.approx(statistics.stdev(accuracies))
    table = out.splitlines()
    assert table[0].split()[:3] == ["model", "method", "tau"]
    summary = next(line for line in table if line.startswith("routed (mean ± sd of 2)"))
    assert f"{100 * group['accuracy_mean']:.2f} ± {100 * group['accuracy_sd']:.2f}" in summary
    assert any(line.startswith(str(tmp_path / "lora")) and " lora " in line for line in table)
    # The same JSON feeds `plot`: one point per model, on the total-rank axis too.
    (tmp_path / "all.json").write_text(out.splitlines()[-1])
    png = tmp_path / "all.png"
    assert main(["plot", str(tmp_path / "all.json"), "--axes", "mean_active_rank", "--output", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_evaluate_and_calibrate_show_progress_unless_asked_not_to(tiny_base, toy_data, tmp_path: Path, capsys):
    _, dev = toy_data
    output = tmp_path / "model"
    assert main(quick_train(tiny_base, toy_data, output)) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(output), "--data", str(dev), "--json"]) == 0
    assert "evaluate" in capsys.readouterr().err
    calibrate = ["calibrate", "--model", str(output), "--data", str(dev), "--taus", "0.3,0.5", "--dry-run", "--json"]
    assert main([*calibrate, "--target-active-fraction", "1"]) == 0
    err = capsys.readouterr().err
    assert "calibrate" in err and "2/2" in err
    assert main(["evaluate", "--model", str(output), "--data", str(dev), "--json", "--no-progress"]) == 0
    assert main([*calibrate, "--target-active-fraction", "1", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_calibrate_never_picks_a_tau_that_switches_every_adapter_off(tiny_base, toy_data, tmp_path: Path, capsys):
    _, dev = toy_data
    output = tmp_path / "model"
    assert main(quick_train(tiny_base, toy_data, output)) == 0
    capsys.readouterr()
    argv = ["calibrate", "--model", str(output), "--data", str(dev), "--no-progress", "--json"]
    # tau 1: p > 1 never holds, every gate is off; it is "within" a zero budget but must not be chosen.
    assert main([*argv, "--taus", "0.5,1.0", "--target-active-fraction", "0"]) == 1
    captured = capsys.readouterr()
    payload = last_json(captured.out)
    assert payload["chosen"] is None and not payload["written"]
    assert payload["points"][1]["mean_active_adapters"] == 0.0
    assert "switches every adapter off" in captured.err and read_meta(output).tau == 0.5
    # With room in the budget the same grid picks the tau at which adapters still run.
    assert main([*argv, "--taus", "0.5,1.0", "--target-active-fraction", "1", "--pick", "budget"]) == 0
    assert last_json(capsys.readouterr().out)["chosen"]["tau"] == 0.5


def test_calibrate_to_a_total_active_rank(tiny_base: Path, toy_data, tmp_path: Path, capsys) -> None:
    _, dev = toy_data
    output = tmp_path / "rad"
    extra = ("--rank-set", "0,2,4", "--target-active-rank", "12", "--warmup-gates-on-steps", "2")
    assert main(quick_train(tiny_base, toy_data, output, "radlora", *extra)) == 0
    meta = read_meta(output)
    assert meta.metrics["target_active_rank"] == 12.0 and meta.metrics["final_rank_lambda"] >= 0
    capsys.readouterr()
    argv = ["calibrate", "--model", str(output), "--data", str(dev), "--no-progress", "--json", "--pick", "budget"]
    taus = "0.1,0.3,0.5,0.7,0.9"
    assert main([*argv, "--taus", taus, "--target-active-rank", "1e9", "--dry-run"]) == 0
    points = last_json(capsys.readouterr().out)["points"]
    ranks = [point["mean_active_rank"] for point in points]
    live = [rank for rank in ranks if rank > 0]
    assert live, ranks
    budget = statistics.median(live)  # between the curve's ends: some taus meet it, some do not
    assert main([*argv, "--taus", taus, "--target-active-rank", str(budget)]) == 0
    payload = last_json(capsys.readouterr().out)
    within = [p["tau"] for p in points if 0 < p["mean_active_rank"] <= budget + 1e-9]
    assert payload["target_active_rank"] == budget and payload["chosen"]["tau"] == min(within)
    assert read_meta(output).tau == min(within)
    calibration = (read_meta(output).model_extra or {})["calibration"]
    assert calibration["target_active_rank"] == budget


def test_a_misspelt_flag_is_reported_with_the_commands_own_usage(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", "--model", "m", "--data", "d.tsv", "--label-names", "negative,positive"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m training evaluate" in err and "unrecognized arguments: --label-names" in err
    with pytest.raises(SystemExit):
        main(
            [
                "calibrate",
                "--model",
                "m",
                "--data",
                "d.tsv",
                "--target-active-rank",
                "4",
                "--target-active-fraction",
                "1",
            ]
        )
    assert "not allowed with argument" in capsys.readouterr().err


def test_plotting_is_part_of_every_install() -> None:
    """`training sweep` and `plot` (and the load tester's --plot) draw with matplotlib: a core dependency."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(requirement.startswith("matplotlib") for requirement in project["dependencies"])
