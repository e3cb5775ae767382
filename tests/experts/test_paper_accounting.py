"""`train.expert_epoch: dataset`, the paper's accounting: each expert's epoch is a whole data set's,
drawn with replacement from its own shards; the baseline is compute-matched and `baseline_1x` is
the paper's single model at 1x; the report compares MoDE with both."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from experts.jobs import baseline_jobs, expert_job
from pipelines.core.config import ConfigError, TrainConfig, load_config

from conftest import write_config


def test_an_experts_epoch_is_its_own_cluster_or_a_whole_data_sets_drawn_with_replacement():
    fair, paper = TrainConfig(expert_epochs=2), TrainConfig(expert_epochs=2, expert_epoch="dataset")
    start = (Path("seed.pt"), 3)
    own = expert_job(fair, "expert_000", [Path("a.tar")], start, "fp", dataset_samples=1000)
    drawn = expert_job(paper, "expert_000", [Path("a.tar")], start, "fp", dataset_samples=1000)
    assert (own.num_samples, own.resampled) == (None, False)  # one pass over its shards (sizes.json)
    assert (drawn.num_samples, drawn.resampled, drawn.epochs) == (1000, True, 5)


def test_the_paper_accounting_trains_a_compute_matched_baseline_and_one_at_1x():
    start = (Path("seed.pt"), 3)
    fair = baseline_jobs(TrainConfig(), "all.tar", start, experts=4, expert_samples=1010, dataset_samples=1000,
                         fingerprint="fp")
    assert [(j.name, j.num_samples, j.resampled) for j in fair] == [("baseline", 1010, False)]
    paper = baseline_jobs(TrainConfig(expert_epoch="dataset"), "all.tar", start, experts=4, expert_samples=1010,
                          dataset_samples=1000, fingerprint="fp")
    assert [(j.name, j.num_samples, j.resampled) for j in paper] == [("baseline", 4000, True),
                                                                      ("baseline_1x", 1000, False)]
    assert len({j.fingerprint for j in paper}) == 2


def test_an_unknown_accounting_is_refused(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match="train.expert_epoch"):
        load_config(write_config(tmp_path / "c.yaml", tiny_data, train={"expert_epoch": "epoch"}))


def test_the_default_accounting_keeps_existing_fingerprints():
    from pipelines.core.config import section_hash

    assert section_hash(TrainConfig()) == section_hash(dataclasses.replace(TrainConfig(), expert_epoch="cluster"))
    assert section_hash(TrainConfig()) != section_hash(dataclasses.replace(TrainConfig(), expert_epoch="dataset"))


@pytest.mark.slow
def test_a_run_in_the_paper_accounting_reports_both_comparisons(tiny_run, tmp_path):
    from pipelines.run.stages import run_stage

    registry = json.loads((tiny_run["run_dir"] / "train" / "registry.json").read_text())
    config = write_config(tmp_path / "c.yaml", Path(load_config(tiny_run["config"]).synth.out_dir),
                          train={"seed_checkpoint": registry["seed"]["checkpoint"], "expert_epoch": "dataset",
                                 "batch_size": 16, "warmup": 2, "seed_epochs": 1, "expert_epochs": 1},
                          report={"seeds": 1, "resamples": 200})
    cfg, run = load_config(config), tmp_path / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "split"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    train = run_stage("train", cfg, run)
    seen = train["counts"]["samples_seen"]
    dataset = train["counts"]["seed_samples"]
    total = {name: sum(v.values()) for name, v in seen.items()}
    for expert in ("expert_000", "expert_001"):  # a whole data set's samples each, not its cluster's
        assert dataset - 16 <= total[expert] <= dataset
    assert 2 * dataset - 32 <= total["baseline"] <= 2 * dataset and dataset - 16 <= total["baseline_1x"] <= dataset
    assert "dataset_resampled: True" in (run / "train" / "expert_000.log").read_text()
    for stage in ("evaluate", "report"):
        run_stage(stage, cfg, run)
    report = json.loads((run / "report" / "report.json").read_text())
    assert "baseline_1x" in report["rows"]
    assert "vs_baseline_1x" in report["table"]["routed ensemble"]["mean"]
    assert report["cost"]["routed ensemble"]["samples"] > report["cost"]["baseline_1x"]["samples"]
    assert "The paper's comparison" in (run / "report" / "report.md").read_text()
