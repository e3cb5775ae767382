"""The expert phase's length (`evaluate.ablations: expert_epochs=<e>`): the experts and a matched
baseline continue the run's own seed from an earlier epoch of the same schedule, so every length
costs the same in total and is compared with the single model continued from the same epoch."""

import json
import os
from pathlib import Path

import pytest

from experts.models import prune_checkpoints
from pipelines.core.config import ConfigError, load_config
from pipelines.core.layout import RunLayout
from pipelines.run.ablations import run_ablation
from pipelines.run.stages import run_stage

from conftest import write_config

# a 2-epoch seed keeping its epoch 1; the run's experts train epoch 3, the variant's epochs 2 and 3
PHASE = {"seed_epochs": 2, "expert_epochs": 1, "keep_seed_epochs": [1], "patch_dropout": 0.0,
         "unmasked_tune_share": 0.0}


def phase_config(path, data, train=None, **sections):
    sections.setdefault("evaluate", {"ablations": ["expert_epochs=2"]})
    return write_config(path, data, train={**PHASE, **(train or {})}, report={"seeds": 1, "resamples": 200},
                        **sections)


def test_a_phase_needs_its_seed_epoch_kept_another_length_and_a_seed_trained_here(tmp_path, tiny_data):
    load_config(phase_config(tmp_path / "ok.yaml", tiny_data))
    with pytest.raises(ConfigError, match=r"add 1 to train.keep_seed_epochs"):
        load_config(phase_config(tmp_path / "c.yaml", tiny_data, train={"keep_seed_epochs": []}))
    with pytest.raises(ConfigError, match="another length than the run's own"):
        load_config(phase_config(tmp_path / "c.yaml", tiny_data, evaluate={"ablations": ["expert_epochs=1"]}))
    with pytest.raises(ConfigError, match="needs 1 <= expert_epochs < 3"):
        load_config(phase_config(tmp_path / "c.yaml", tiny_data, evaluate={"ablations": ["expert_epochs=3"]}))
    with pytest.raises(ConfigError, match="train.seed_schedule continued"):
        load_config(phase_config(tmp_path / "c.yaml", tiny_data, train={"seed_schedule": "annealed"}))
    with pytest.raises(ConfigError, match="train.keep_seed_epochs must list epochs of the seed before its last"):
        load_config(phase_config(tmp_path / "c.yaml", tiny_data, train={"keep_seed_epochs": [2]}))


def test_pruning_keeps_the_final_epoch_and_the_epochs_asked_for(tmp_path):
    for name in ("epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_latest.pt", "tmp.pt"):
        (tmp_path / name).write_bytes(b"x")
    gone = prune_checkpoints(tmp_path, 3, keep=(1,))
    assert sorted(p.name for p in gone) == ["epoch_2.pt", "epoch_latest.pt", "tmp.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt", "epoch_3.pt"]


@pytest.fixture(scope="module")
def phased(tiny_run, tmp_path_factory):
    """The tiny run's embed, cluster and split; a 2-epoch seed, its 1-epoch experts and baseline, and
    the 2-epoch expert phase from the seed's epoch 1; evaluated and reported."""
    root = tmp_path_factory.mktemp("phase")
    config = phase_config(root / "c.yaml", Path(load_config(tiny_run["config"]).synth.out_dir))
    cfg, run = load_config(config), root / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "split"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    train = run_stage("train", cfg, run)
    variant = run_ablation("expert_epochs=2", cfg, run)
    for stage in ("evaluate", "report"):
        run_stage(stage, cfg, run)
    return run, train, variant


@pytest.mark.slow
def test_the_phase_continues_the_seeds_kept_epoch_with_experts_and_a_baseline(phased):
    run, train, variant = phased
    seed_checkpoints = run / "train" / "logs" / "seed" / "checkpoints"
    assert sorted(p.name for p in seed_checkpoints.iterdir()) == ["epoch_1.pt", "epoch_2.pt"]
    phase = RunLayout(run).ablation("expert_epochs=2")
    registry = json.loads(phase.registry.read_text())
    assert registry["seed"]["checkpoint"] == str((seed_checkpoints / "epoch_1.pt").resolve())
    assert registry["seed"]["epochs"] == 1 and registry["epochs_total"] == 3
    assert registry["baseline"] is not None
    assert not phase.run_logs("seed").exists()
    # twice the run's expert phase, for each expert and for the baseline (whole batches apart)
    own, longer = train["counts"]["samples_seen"], variant["counts"]["samples_seen"]
    for model in ("expert_000", "expert_001", "baseline"):
        assert sum(longer[model].values()) == pytest.approx(2 * sum(own[model].values()), abs=32)


@pytest.mark.slow
def test_each_length_is_compared_with_the_baseline_from_the_same_seed_epoch_at_the_same_cost(phased):
    run, _, _ = phased
    results = json.loads((run / "evaluate" / "results.json").read_text())
    phase_rows = ["expert_epochs=2 expert_000", "expert_epochs=2 expert_001", "expert_epochs=2 routed ensemble",
                  "expert_epochs=2 uniform ensemble"]
    assert results["rows"][-5:] == ["expert_epochs=2 baseline", *phase_rows]
    assert results["references"] == dict.fromkeys(phase_rows, "expert_epochs=2 baseline")
    report = json.loads((run / "report" / "report.json").read_text())
    assert [(p["expert_epochs"], p["seed_epochs"], p["baseline"]) for p in report["phases"]] == [
        (1, 2, "baseline"), (2, 1, "expert_epochs=2 baseline")]
    assert "vs_reference" in report["table"]["expert_epochs=2 routed ensemble"]["mean"]
    assert "vs_reference" not in report["table"]["routed ensemble"]["mean"]
    cost = report["cost"]
    for row in ("expert_epochs=2 routed ensemble", "expert_epochs=2 baseline"):  # the same total compute
        assert cost[row]["samples"] == pytest.approx(cost["routed ensemble"]["samples"], rel=0.1)
    markdown = (run / "report" / "report.md").read_text()
    assert "The expert phase's length" in markdown and "| 2 (1) | routed |" in markdown
    assert "Each expert on the task routed to it most, against the baseline of its length" in markdown
    assert [p["experts"] for p in report["phases"]] == [
        {"expert_000": "expert_000", "expert_001": "expert_001"},
        {"expert_000": "expert_epochs=2 expert_000", "expert_001": "expert_epochs=2 expert_001"}]
    assert [s["model"] for s in report["specialists"]] == ["expert_000", "expert_001"]  # the run's own only
    one = report["cost"]["expert_epochs=2 expert_000"]["samples"]  # the seed's first epoch and this expert
    assert report["cost"]["seed"]["samples"] / 2 < one < report["cost"]["expert_epochs=2 routed ensemble"]["samples"]
