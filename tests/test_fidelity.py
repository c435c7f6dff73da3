"""Routing fidelity: shadow dense checks and routing drift (service.fidelity)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import SHARED_DATA, Described, synthetic_checkpoint, tiny_text

from cogalora import read_meta
from service.engine import Engine, PreparedRow
from service.fidelity import DriftWindow, ShadowSampler, mean_absolute_difference
from service.metrics import ServiceMetrics
from service.repository import ModelRepository
from service.schemas import RowResult
from service.types import BatchStats, RoutingSample, ShadowOutcome

MODELS = Path(__file__).resolve().parents[1] / "models"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=["int8", "float32"])
def tiny_repository(request: pytest.FixtureRequest, tmp_path: Path, tiny_base_dir: Path) -> ModelRepository:
    root = tmp_path / "models"
    synthetic_checkpoint(root / "two", str(tiny_base_dir), ["neg", "pos"], seed=0)
    synthetic_checkpoint(root / "three", str(tiny_base_dir), ["x", "y", "z"], seed=4)
    synthetic_checkpoint(root / "plain", str(tiny_base_dir), ["neg", "pos"], method="lora", seed=8)
    repository = ModelRepository(root, precision=request.param)
    assert repository.scan() == {}
    return repository


def prepare(engine: Engine, adapter: str, texts: list[str], threshold: float | None = None) -> list[PreparedRow]:
    loaded = engine.repository.acquire(adapter)
    engine.repository.release(loaded)
    return engine.tokenize(loaded, texts, tau=threshold)


def mixed_rows(engine: Engine) -> list[PreparedRow]:
    """Rows of three adapters (one plain LoRA), several lengths and taus, including tau 0."""
    rows = prepare(engine, "two", [tiny_text(n, seed=n) for n in (1, 3, 7, 12, 20)])
    rows += prepare(engine, "three", [tiny_text(n, seed=50 + n) for n in (2, 7, 15)], threshold=0.3)
    rows += prepare(engine, "two", [tiny_text(9, seed=99)], threshold=0.0)
    rows += prepare(engine, "plain", [tiny_text(n, seed=70 + n) for n in (4, 11)])
    random.Random(0).shuffle(rows)
    return rows


def eligible(rows: list[PreparedRow]) -> int:
    """Rows a shadow check can tell anything about: a routed adapter and a tau above 0."""
    return sum(row.adapter.routed and row.tau > 0 for row in rows)


# ---- shadow dense checks ----------------------------------------------------------------------


def test_shadow_rows_never_change_any_answer(tiny_repository: ModelRepository) -> None:
    plain = Described(Engine(tiny_repository, tune_malloc=False))
    shadowed = Described(Engine(tiny_repository, tune_malloc=False, shadow_fraction=1.0))
    rows = mixed_rows(plain)
    expected = plain.run_batch(rows)
    outcome = shadowed.run_batch(rows)
    assert len(outcome.results) == len(rows)
    for got, want in zip(outcome.results, expected.results, strict=True):
        assert isinstance(got, RowResult) and isinstance(want, RowResult)
        # Exactly, in every precision: the served rows' forwards are those of a batch without shadows.
        assert got.model_dump() == want.model_dump()
    (stats,) = outcome.stats
    (baseline,) = expected.stats
    assert expected.stats[0].shadow == ()
    assert len(stats.shadow) == eligible(rows) == 8, "every routed row with tau > 0, and only those"
    assert stats.rows == baseline.rows == len(rows), "shadow rows are not counted as served rows"
    assert stats.real_tokens > baseline.real_tokens, "shadow rows ran in the same batch"
    assert stats.forwards > baseline.forwards, "in forwards of their own"


def test_shadow_compares_with_every_gate_forced_on(tiny_repository: ModelRepository) -> None:
    shadowed = Described(Engine(tiny_repository, tune_malloc=False, shadow_fraction=1.0))
    dense = Described(Engine(tiny_repository, tune_malloc=False, force_gates="on"))
    texts = [tiny_text(n, seed=200 + n) for n in range(2, 26)]
    rows = prepare(shadowed, "two", texts)
    outcome = shadowed.run_batch(rows)
    forced = dense.run_batch(prepare(dense, "two", texts)).results
    (stats,) = outcome.stats
    assert [o.adapter for o in stats.shadow] == ["two"] * len(texts)
    # Outcomes come in length order; match each to its row by recomputing the expectation per row.
    expected = []
    for routed, on in zip(outcome.results, forced, strict=True):
        dense_score = next(s.score for s in on.scores if s.label == routed.label)
        expected.append((routed.label == on.label, abs(routed.score - dense_score)))
    got = sorted((o.agree, o.score_difference) for o in stats.shadow)
    for (agree, difference), (want_agree, want_difference) in zip(got, sorted(expected), strict=True):
        assert agree == want_agree
        assert difference == pytest.approx(want_difference, abs=1e-5)
    assert any(not agree for agree, _ in expected) or any(d > 1e-3 for _, d in expected), (
        "the synthetic adapter must make routing matter, or this test proves nothing"
    )


def test_shadow_sampling_is_seeded_and_bounded() -> None:
    assert not any(ShadowSampler(0.0).pick() for _ in range(1000))
    assert all(ShadowSampler(1.0).pick() for _ in range(1000))
    sampler, again = ShadowSampler(0.05, seed=3), ShadowSampler(0.05, seed=3)
    picks = [sampler.pick() for _ in range(4000)]
    assert picks == [again.pick() for _ in range(4000)]
    assert 0.03 < sum(picks) / len(picks) < 0.07
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ShadowSampler(1.5)


def test_shadow_metrics_move_by_exactly_the_shadow_rows() -> None:
    metrics = ServiceMetrics()
    outcomes = (
        ShadowOutcome("a", True, 0.01),
        ShadowOutcome("a", False, 0.4),
        ShadowOutcome("a", True, 0.0),
        ShadowOutcome("b", True, 0.2),
    )
    metrics.on_batch(BatchStats(4, 1, 40, 30, 0.01, 10, shadow=outcomes))
    value = metrics.registry.get_sample_value
    assert value("cogalora_shadow_rows_total", {"adapter": "a", "agreement": "agree"}) == 2
    assert value("cogalora_shadow_rows_total", {"adapter": "a", "agreement": "disagree"}) == 1
    assert value("cogalora_shadow_rows_total", {"adapter": "b", "agreement": "agree"}) == 1
    assert value("cogalora_shadow_score_difference_count", {"adapter": "a"}) == 3
    assert value("cogalora_shadow_score_difference_sum", {"adapter": "a"}) == pytest.approx(0.41)
    assert value("cogalora_shadow_score_difference_bucket", {"adapter": "a", "le": "0.01"}) == 2


# ---- routing drift ----------------------------------------------------------------------------


def test_drift_window_fills_slides_and_scores() -> None:
    window = DriftWindow(10)
    reference = (0.5, 0.0)
    assert window.add(RoutingSample("a", 6, (3, 0), reference)) is None, "not full yet"
    assert window.add(RoutingSample("a", 4, (2, 0), reference)) == pytest.approx(0.0)
    # Ten rows with the first site always on: the old blocks slide out, drift = (|1 - .5| + 0) / 2.
    assert window.add(RoutingSample("a", 10, (10, 0), reference)) == pytest.approx(0.25)
    assert window.add(RoutingSample("a", 5, (0, 5), reference)) == pytest.approx((abs(5 / 15 - 0.5) + 5 / 15) / 2)
    window.forget("a")
    assert window.add(RoutingSample("a", 3, (3, 3), reference)) is None
    assert window.add(RoutingSample("b", 0, (), ())) is None
    assert mean_absolute_difference([0.2, 0.9], [0.1, 1.0]) == pytest.approx(0.1)


def test_drift_gauge_per_adapter_and_never_for_other() -> None:
    from service.metrics import AdapterLabels

    metrics = ServiceMetrics(AdapterLabels("a"), drift_window=4)
    samples = (RoutingSample("a", 4, (4, 0), (0.5, 0.5)), RoutingSample("b", 4, (0, 0), (0.5, 0.5)))
    metrics.on_batch(BatchStats(8, 1, 80, 80, 0.01, 4, routing=samples))
    value = metrics.registry.get_sample_value
    assert value("cogalora_routing_drift", {"adapter": "a"}) == pytest.approx(0.5)
    assert value("cogalora_routing_drift", {"adapter": "other"}) is None
    assert ServiceMetrics(drift_window=0).drift is None


def test_activation_reference_is_only_offered_at_the_served_tau(tmp_path: Path, tiny_base_dir: Path) -> None:
    directory = synthetic_checkpoint(tmp_path / "a", str(tiny_base_dir), ["neg", "pos"])
    meta = read_meta(directory)
    rates = {"layer.0.attention.query": 0.25}
    assert meta.activation_reference() == dict.fromkeys(meta.activation_reference(), 0.5), "conftest's nominal rates"
    assert meta.model_copy(update={"metrics": {}}).activation_reference() is None, "no rates recorded"
    trained = meta.model_copy(update={"metrics": {"per_module_activation_rate": rates}, "training": {"tau": 0.5}})
    assert trained.activation_reference() == rates
    moved = trained.model_copy(update={"tau": 0.7})
    assert moved.activation_reference() is None, "rates measured at another tau are no reference"
    calibrated = json.loads(moved.model_dump_json(by_alias=True))
    calibrated["calibration"] = {"chosen": {"tau": 0.7, "per_module_activation_rate": {"x": 1}}}
    assert type(meta).model_validate(calibrated).activation_reference() == {"x": 1.0}


def test_engine_reports_gate_counts_at_the_reference_sites(tmp_path: Path, tiny_base_dir: Path) -> None:
    directory = synthetic_checkpoint(tmp_path / "models" / "two", str(tiny_base_dir), ["neg", "pos"])
    meta = json.loads((directory / "cogalora.json").read_text())
    sites = [f"layer.{layer}.attention.query" for layer in (0, 1)] + ["layer.1.ffn.down"]
    meta["metrics"]["per_module_activation_rate"] = {site: 0.5 for site in sites}
    (directory / "cogalora.json").write_text(json.dumps(meta))
    repository = ModelRepository(tmp_path / "models")
    assert repository.scan() == {}
    engine = Described(Engine(repository, tune_malloc=False, shadow_fraction=1.0))
    texts = [tiny_text(n, seed=n) for n in range(1, 9)]
    rows = prepare(engine, "two", texts) + prepare(engine, "two", texts[:3], threshold=0.2)
    outcome = engine.run_batch(rows)
    samples = [sample for stats in outcome.stats for sample in stats.routing]
    assert sum(sample.rows for sample in samples) == len(texts), "only rows at the adapter's own tau"
    assert all(sample.reference == (0.5, 0.5, 0.5) for sample in samples)
    active = [sum(sample.active[i] for sample in samples) for i in range(3)]
    want = [sum(f"{site}" in result.active_modules for result in outcome.results[: len(texts)]) for site in sites]
    assert active == want


# ---- on the committed models and real data ---------------------------------------------------


@pytest.mark.integration
def test_drift_stays_low_on_dev_data_and_rises_on_another_domain() -> None:
    sst2_dev = SHARED_DATA / "sst2-sentences" / "dev.tsv"
    agnews_dev = SHARED_DATA / "agnews" / "dev.tsv"
    if not (sst2_dev.is_file() and agnews_dev.is_file()):
        pytest.skip(f"needs the shared data ({sst2_dev}, {agnews_dev})")
    if read_meta(MODELS / "sst2").activation_reference() is None:
        pytest.skip("models/sst2 records no activation rates at its served tau")
    rows = 400
    repository = ModelRepository(MODELS, max_loaded=2)
    repository.scan()
    engine = Described(Engine(repository, tune_malloc=False))

    def drift(path: Path) -> float:
        texts = [line.split("\t")[0] for line in path.read_text(encoding="utf-8").splitlines()[1 : rows + 1]]
        window = DriftWindow(rows)
        value = None
        for start in range(0, rows, 32):
            outcome = engine.run_batch(prepare(engine, "sst2", texts[start : start + 32]))
            for sample in (s for stats in outcome.stats for s in stats.routing):
                value = window.add(sample)
        assert value is not None
        return value

    in_domain, other_domain = drift(sst2_dev), drift(agnews_dev)
    print(f"routing drift on {rows} rows: sst2 dev {in_domain:.4f}, AG News {other_domain:.4f}")
    assert in_domain < 0.05
    assert other_domain > 2 * in_domain + 0.05
