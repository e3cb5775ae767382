"""The cost of a run before it starts: disk for checkpoints, launches, wall time; checkpoint pruning."""

from pathlib import Path

import pytest

from experts.budget import (
    DiskSpaceError,
    check_disk,
    checkpoint_bytes,
    estimate_run,
    model_disk_bytes,
    train_disk_need,
)
from experts.models import newest_epoch, prune_checkpoints
from pipelines.core.config import ClusterConfig, Config, EvaluateConfig, ReportConfig, TrainConfig

FLOPS = {"masked": 1e9, "unmasked": 2e9}


def test_a_checkpoint_holds_weights_and_two_optimizer_moments():
    assert checkpoint_bytes(1_000_000) == 12_000_000
    assert model_disk_bytes(1_000_000, epochs=5, keep="needed") == 12_000_000 + 4_000_000
    assert model_disk_bytes(1_000_000, epochs=5, keep="all") == 5 * 12_000_000 + 4_000_000


def test_disk_need_counts_models_left_and_the_peak_of_those_training_at_once():
    assert train_disk_need(10**6, models_left=0, epochs=3, concurrent=4, keep="needed") == 0
    one = train_disk_need(10**6, models_left=1, epochs=3, concurrent=4, keep="needed")
    assert one == 16 * 10**6 + 3 * 12 * 10**6  # the model, plus 3 more checkpoints at its peak
    assert train_disk_need(10**6, 6, 3, 2, "needed") == 6 * 16 * 10**6 + 2 * 3 * 12 * 10**6


def test_a_disk_too_small_is_refused_in_one_line_naming_the_fix(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 90, 10))
    assert "free at" in check_disk(tmp_path, 10, "x")
    with pytest.raises(DiskSpaceError) as err:
        check_disk(tmp_path, 11, "the checkpoints")
    assert "\n" not in str(err.value) and "--run-dir" in str(err.value)


def test_pruning_keeps_the_final_checkpoint_alone(tmp_path):
    for name in ("epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_latest.pt", "tmp.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert newest_epoch(tmp_path) == 3
    gone = prune_checkpoints(tmp_path, 3)
    assert sorted(p.name for p in gone) == ["epoch_1.pt", "epoch_2.pt", "epoch_latest.pt", "tmp.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_3.pt"]
    assert newest_epoch(tmp_path) == 3 and newest_epoch(tmp_path / "none") == -1


def test_estimate_counts_the_launches_train_makes():
    cfg = Config(cluster=ClusterConfig(num_fine=16, num_experts=4),
                 train=TrainConfig(seed_epochs=3, expert_epochs=1, patch_dropout=0.0),
                 evaluate=EvaluateConfig(ablations=["random", "experts=2"]), report=ReportConfig(seeds=1))
    est = estimate_run(cfg, 1000, FLOPS, params=10**6)
    assert est.launches == 1 + 4 + 4 + 2 + 1  # seed, experts, Rand-4, MoDE-2, baseline
    assert est.waves == 1 + 4 + 4 + 2 + 1  # one GPU, one model at a time
    assert est.samples == 1000 * (3 + 3 * 1 + 1)  # seed; three sets of experts; baseline
    packed = estimate_run(Config(**{**cfg.__dict__, "train": TrainConfig(seed_epochs=3, expert_epochs=1,
                                                                         patch_dropout=0.0, models_per_gpu=4)}),
                          1000, FLOPS, params=10**6)
    assert packed.waves == 1 + 1 + 1 + 1 + 1 and packed.flops == est.flops and packed.seconds < est.seconds


def test_an_expert_phase_of_another_length_counts_its_experts_and_baseline_for_its_epochs():
    cfg = Config(cluster=ClusterConfig(num_fine=16, num_experts=4),
                 train=TrainConfig(seed_epochs=7, expert_epochs=1, patch_dropout=0.0, keep_seed_epochs=[4, 6]),
                 evaluate=EvaluateConfig(ablations=["expert_epochs=2", "expert_epochs=4"]),
                 report=ReportConfig(seeds=3))
    est = estimate_run(cfg, 16_000, FLOPS, params=10**6)
    assert est.launches == 3 * (1 + 3 * (4 + 1))  # a seed; three lengths of 4 experts and a baseline
    assert est.samples == 3 * 16_000 * (7 + 1 * 2 + 2 * 2 + 4 * 2)  # each length: experts + baseline, e epochs
    kept = 3 * 2 * checkpoint_bytes(10**6)  # the seed's epochs 4 and 6, for each trainer seed
    assert est.disk_bytes == 48 * model_disk_bytes(10**6, 8, "needed") + est.assumptions["transient_bytes"] + kept


def test_the_unmasked_tune_is_its_own_launch_and_costs_unmasked_flops():
    cfg = Config(cluster=ClusterConfig(num_fine=16, num_experts=2),
                 train=TrainConfig(seed_epochs=2, expert_epochs=5, patch_dropout=0.5, unmasked_tune_share=0.2))
    est = estimate_run(cfg, 100, FLOPS, params=10**6)
    assert est.launches == 1 + 2 * (2 + 1)  # the seed, then each expert and the baseline masked + tune
    tuned = 100 * 1 * 2  # one tune epoch over the experts' data (all of it, split in two) and one of the baseline
    assert est.flops == (100 * (2 + 5 + 5) - tuned) * 1e9 + tuned * 2e9


@pytest.mark.parametrize("preset", ["configs/repro-gpu.yaml", "configs/sweep-gpu.yaml"])
def test_gpu_presets_state_an_estimate_within_eight_minutes_and_their_disk(preset):
    from pipelines.run.estimate import estimate_config, stated_estimate

    est = estimate_config(Path(preset))
    stated = stated_estimate(Path(preset))
    assert est.seconds <= 8 * 60, est.lines()
    assert stated["minutes"] == pytest.approx(est.seconds / 60, abs=0.05), est.lines()
    assert stated["disk_gb"] == pytest.approx(est.disk_bytes / 1e9, abs=0.05), est.lines()


def test_loader_workers_are_fitted_to_the_node_in_advice_not_silently():
    from experts.budget import loader_advice

    assert "train.workers: 15 fits" in loader_advice(1, 1, 16)  # one model starving a 16-core node
    assert "train.workers: 3 fits" in loader_advice(1, 4, 16)
    assert loader_advice(3, 4, 16) is None  # the preset's choice: 12 of 16 cores
    assert "compete" in loader_advice(8, 4, 16)
    assert loader_advice(1, 1, 2) is None  # a 2-core CPU box is not a GPU node to fill
