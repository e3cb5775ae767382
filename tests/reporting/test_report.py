"""The report stage: means over trainer seeds, paired intervals against the baseline, verdicts that
say "beat" only when the interval excludes zero, hard-negative shares and costs."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation.evaluate import PER_SAMPLE_SCHEMA
from pipelines.core.config import ReportConfig
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import atomic_write_json, write_manifest
from pipelines.run.stages import run_section

ROWS = ["seed", "baseline", "expert_000", "expert_001", "uniform ensemble", "routed ensemble"]


def fake_evaluation(layout: RunLayout, hits: dict[str, dict[str, np.ndarray]], fingerprint: str,
                    validation: dict | None = None) -> None:
    """An evaluate stage's files: per task and row, the hits on 100 samples (results.json from them)."""
    tasks, table = {}, []
    for task, by_row in hits.items():
        tasks[task] = {"kind": "classification", "routing_weights": [0.9, 0.1] if task == "a" else [0.2, 0.8],
                       **{row: {"top1": float(h.mean())} for row, h in by_row.items()}}
        table += [{"task": task, "row": row, "metric": "top1", "sample": i, "hit": bool(v)}
                  for row, h in by_row.items() for i, v in enumerate(h)]
    atomic_write_json(layout.results, {"routing": "paper", "lam": 0.2, "rows": ROWS, "tasks": tasks,
                                       "lambda": {"MoDE": {"value": 0.2, "source": "validation"}},
                                       "validation": validation or {}})
    pq.write_table(pa.Table.from_pylist(table, schema=PER_SAMPLE_SCHEMA), layout.per_sample)
    write_manifest(layout.evaluate, stage="evaluate", fingerprint=fingerprint, config_hash="x", inputs={},
                   outputs={}, counts={}, started=time.time())


@pytest.fixture
def run(tmp_path):
    """Two trainer seeds: on task a the routed ensemble is right on 30 more of 100 samples than the
    baseline in both seeds; on task b it is better in one seed and worse in the other."""
    layout = RunLayout(tmp_path)
    base = np.r_[np.ones(50), np.zeros(50)]
    better = np.r_[np.ones(80), np.zeros(20)]
    worse = np.r_[np.ones(35), np.zeros(65)]
    for k, replica in enumerate([layout, layout.replicate(1)]):
        rows = dict.fromkeys(ROWS, base)
        fake_evaluation(replica, {"a": {**rows, "routed ensemble": better},
                                  "b": {**rows, "routed ensemble": better if k == 0 else worse}}, f"e{k}",
                        {"a_val": {"kind": "classification", "seed": {"top1": 0.3},
                                   "baseline": {"top1": 0.4 + 0.2 * k}}})
    atomic_write_json(layout.cluster_report, {"fine_sizes": [30, 10, 40, 20],
                                              "expert_fine_clusters": [[0, 1], [2, 3]]})
    atomic_write_json(layout.registry, {"seed": {"epochs": 2}, "epochs_total": 3, "experts": [{}, {}]})
    seen = {m: {"masked": 100, "unmasked": 0} for m in ("seed", "baseline")} | \
        {m: {"masked": 50, "unmasked": 0} for m in ("expert_000", "expert_001")}
    write_manifest(layout.train, stage="train", fingerprint="t", config_hash="x", inputs={}, outputs={},
                   counts={"samples_seen": seen, "flops_per_sample": {"masked": 2.0, "unmasked": 3.0}},
                   started=time.time())
    run_section("report", ReportConfig(seeds=2, resamples=400), layout)
    return layout


def test_means_are_over_the_trainer_seeds(run):
    report = json.loads(run.report_json.read_text())
    assert report["table"]["routed ensemble"]["a"]["mean"] == pytest.approx(0.8)
    assert report["table"]["routed ensemble"]["b"]["mean"] == pytest.approx((0.8 + 0.35) / 2)
    assert report["table"]["routed ensemble"]["b"]["std"] == pytest.approx(np.std([0.8, 0.35], ddof=1))


def test_a_difference_that_holds_in_every_seed_is_a_win_and_one_that_flips_is_not(run):
    text = run.report_markdown.read_text()
    a = json.loads(run.report_json.read_text())["table"]["routed ensemble"]["a"]["vs_baseline"]
    assert a["low"] > 0 and a["mean"] == pytest.approx(0.3)
    assert "- a: beat: +30.0 [" in text
    assert "- b: no significant difference: +7.5 [" in text


def test_the_report_says_which_noise_its_intervals_cover(run):
    assert "over trainer seeds and test samples" in run.report_markdown.read_text()


def test_hard_negative_shares_come_from_the_cluster_sizes(run):
    report = json.loads(run.report_json.read_text())
    shares = {s["model"]: s for s in report["specialists"]}
    # expert_000 holds fine clusters of 30 and 10 samples: (30*29 + 10*9) / (40*39) of its pairs
    assert shares["expert_000"]["same_fine_cluster"] == pytest.approx((30 * 29 + 10 * 9) / (40 * 39))
    assert report["negatives"]["same_fine_cluster"] == pytest.approx(
        (30 * 29 + 10 * 9 + 40 * 39 + 20 * 19) / (100 * 99))
    assert shares["expert_000"]["own_task"] == "a" and shares["expert_001"]["own_task"] == "b"


def test_every_trained_row_states_what_it_cost(run):
    report = json.loads(run.report_json.read_text())
    assert report["cost"]["baseline"] == {"samples": 200, "flops": 400.0}
    assert report["cost"]["routed ensemble"] == {"samples": 200, "flops": 400.0}  # the same compute
    assert report["paper_cost_model"]["relative_to_one_model"] == pytest.approx((2 + 2 * 1) / (2 + 1))


def test_a_missing_replicate_says_what_to_run(run):
    (run.replicate(1).evaluate / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="trainer seed 1"):
        run_section("report", ReportConfig(seeds=2, resamples=400), run)


def test_the_validation_split_is_reported_for_the_single_models(run):
    """Recipe settings are chosen on these numbers, so the report shows them, averaged over seeds."""
    report = json.loads(run.report_json.read_text())
    assert report["validation"]["baseline"]["a_val"]["mean"] == pytest.approx(0.5)
    assert report["validation"]["seed"]["a_val"]["std"] == pytest.approx(0.0)
    assert "| baseline | 50.0 ± 14.1 |" in run.report_markdown.read_text()
