"""Stage 4: the seed and the experts, trained by open_clip_train (from the tiny end-to-end run)."""

import json
import math
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_registry_lists_every_expert_with_its_fine_clusters(tiny_run):
    train = tiny_run["run_dir"] / "train"
    registry = json.loads((train / "registry.json").read_text())
    assert [e["id"] for e in registry["experts"]] == [0, 1]
    fines = sorted(f for e in registry["experts"] for f in e["fine_clusters"])
    assert fines == list(range(8))  # every fine cluster has exactly one owner
    split = json.loads((tiny_run["run_dir"] / "split" / "manifest.json").read_text())
    assert [e["samples"] for e in registry["experts"]] == split["counts"]["experts"]


def test_every_model_loads_through_local_dir(tiny_run):
    import open_clip

    train = tiny_run["run_dir"] / "train"
    for name in ["seed", "baseline", "expert_000", "expert_001"]:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{train / name}")
        with torch.no_grad():
            feats = model.encode_image(torch.zeros(1, 3, 64, 64))
        assert feats.shape == (1, 128)


def test_experts_resume_the_seed_checkpoint_and_continue_its_epochs(tiny_run):
    train = tiny_run["run_dir"] / "train"
    seed = torch.load(train / "logs" / "seed" / "checkpoints" / "epoch_1.pt", weights_only=False)
    expert = torch.load(train / "logs" / "expert_000" / "checkpoints" / "epoch_2.pt", weights_only=False)
    assert seed["epoch"] == 1 and expert["epoch"] == 2
    log = (train / "expert_000.log").read_text()
    assert "resuming checkpoint" in log and "seed/checkpoints/epoch_1.pt" in log
    # the expert moved away from the seed
    key = "visual.conv1.weight"
    assert not torch.equal(seed["state_dict"][key], expert["state_dict"][key])


def test_experts_differ_from_each_other(tiny_run):
    from safetensors.torch import load_file

    train = tiny_run["run_dir"] / "train"
    a = load_file(train / "expert_000" / "open_clip_model.safetensors")
    b = load_file(train / "expert_001" / "open_clip_model.safetensors")
    assert not torch.equal(a["text_projection"], b["text_projection"])


def test_the_fair_baseline_continues_the_seed_on_all_data_for_the_experts_compute(tiny_run):
    train = tiny_run["run_dir"] / "train"
    registry = json.loads((train / "registry.json").read_text())
    assert registry["baseline"]["samples"] == sum(e["samples"] for e in registry["experts"])
    baseline = torch.load(train / "logs" / "baseline" / "checkpoints" / "epoch_2.pt", weights_only=False)
    assert baseline["epoch"] == 2
    assert "seed/checkpoints/epoch_1.pt" in (train / "baseline.log").read_text()


def test_experts_train_on_the_split_shards_as_they_are_counted_by_sizes_json(tiny_run):
    train = tiny_run["run_dir"] / "train"
    command = next(line for line in (train / "expert_000.log").read_text().splitlines() if line.startswith("$ "))
    assert "--train-num-samples" not in command
    sizes = json.loads((tiny_run["run_dir"] / "split" / "expert_000" / "sizes.json").read_text())
    from webdataset.shardlists import expand_urls

    train_data = command.split("--train-data ", 1)[1].split(" ", 1)[0]
    assert expand_urls(train_data) == [str((tiny_run["run_dir"] / "split" / "expert_000" / name).resolve())
                                       for name in sorted(sizes)]
    per_epoch = math.ceil(sum(sizes.values()) / 16) * 16  # open_clip counts whole batches of 16
    assert f"[{per_epoch}/{per_epoch} (100%)]" in (train / "expert_000.log").read_text()


def test_a_killed_expert_resumes_from_its_checkpoint_and_a_finished_one_is_not_retrained(tiny_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from pipelines.core.config import load_config
    from pipelines.run.stages import run_stage

    from conftest import write_config

    seed = json.loads((tiny_run["run_dir"] / "train" / "registry.json").read_text())["seed"]["checkpoint"]
    config = write_config(tmp_path / "c.yaml", Path(load_config(tiny_run["config"]).synth.out_dir),
                          train={"seed_checkpoint": seed, "expert_epochs": 3, "baseline": False,
                                 "batch_size": 16, "warmup": 2, "unmasked_tune_share": 0.0})
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "split"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    checkpoints = run / "train" / "logs" / "expert_000" / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.run.cli", "stage", "train", str(config),
                             "--run-dir", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (checkpoints / "epoch_latest.pt").is_file():
        time.sleep(0.05)  # the first expert epoch is saved
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (checkpoints / "epoch_4.pt").is_file()  # really interrupted mid-way

    cfg = load_config(config)
    run_stage("train", cfg, run)
    log = (run / "train" / "expert_000.log").read_text()
    resumed = log[log.rindex("$ "):]
    assert "--resume latest" in resumed.splitlines()[0]
    assert "Start epoch 1" not in resumed and "Start epoch 3" in resumed  # the epoch counter continued
    assert torch.load(checkpoints / "epoch_4.pt", weights_only=False)["epoch"] == 4

    # A finished expert is not trained again: drop the stage manifest, rerun, no new trainer launch.
    launches = {n: (run / "train" / f"{n}.log").read_text().count("$ ") for n in ("expert_000", "expert_001")}
    (run / "train" / "manifest.json").unlink()
    run_stage("train", cfg, run)
    assert launches == {n: (run / "train" / f"{n}.log").read_text().count("$ ") for n in launches}


def test_weights_only_experts_start_a_fresh_schedule_from_a_local_dir_seed(tiny_run, tmp_path):
    import os

    from pipelines.core.config import load_config
    from pipelines.run.stages import run_stage

    from conftest import write_config

    seed_folder = tiny_run["run_dir"] / "train" / "seed"  # a local-dir model, weights only
    config = write_config(tmp_path / "c.yaml", Path(load_config(tiny_run["config"]).synth.out_dir),
                          train={"seed_checkpoint": str(seed_folder), "expert_init": "weights",
                                 "expert_epochs": 1, "baseline": False, "batch_size": 16, "warmup": 2})
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "split"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    run_stage("train", load_config(config), run)
    checkpoint = run / "train" / "logs" / "expert_000" / "checkpoints" / "epoch_1.pt"
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 1  # counted from 0, not from the seed's
    log = (run / "train" / "expert_000.log").read_text()
    assert "loaded checkpoint" in log and "seed_weights.pt" in log and "Start epoch 0" in log


def test_the_seed_of_a_41000_shard_run_launches_with_a_short_command_naming_every_shard(tmp_path, monkeypatch):
    """The seed and the baseline train on every expert shard; at LAION size (41,000 shards) the
    trainer still gets one --train-data of brace patterns that expands to all of them, in order."""
    from webdataset.shardlists import expand_urls

    import experts.train as train
    from experts.shard_sets import write_shard_set
    from pipelines.core.config import DataConfig, TrainConfig
    from pipelines.core.layout import RunLayout
    from pipelines.core.stage import StageContext

    layout = RunLayout(tmp_path / "run")
    per_expert = [10_250] * 4
    for e, count in enumerate(per_expert):
        sizes = {f"{i:05d}.tar": 1000 for i in range(count)}
        write_shard_set(layout.expert_shards(e), sizes, dict.fromkeys(sizes, "0" * 64))
    launched = []

    class Launched(Exception):
        pass

    def record(cmd, *args, **kwargs):
        launched.append(cmd)
        raise Launched

    monkeypatch.setattr(train, "run_trainer", record)
    cfg = TrainConfig(device="cpu")
    ctx = StageContext(cfg, DataConfig(), layout,
                       {"split": {"fingerprint": "f", "num_experts": 4, "counts": {"written": 41_000_000}}})
    with pytest.raises(Launched):
        train.work(ctx, train.fingerprint(ctx))
    cmd = launched[0]
    assert sum(len(arg.encode()) + 1 for arg in cmd) < 64 * 1024  # Linux: 128 KiB per argument
    every_shard = [str((layout.expert_shards(e) / f"{i:05d}.tar").resolve())
                   for e, count in enumerate(per_expert) for i in range(count)]
    assert expand_urls(cmd[cmd.index("--train-data") + 1]) == every_shard


def test_a_trained_run_keeps_only_the_checkpoints_that_resume_and_export_need(tiny_run):
    logs = tiny_run["run_dir"] / "train" / "logs"
    kept = {p.parent.name: sorted(f.name for f in p.iterdir()) for p in logs.glob("*/checkpoints")}
    # the seed's final epoch (every expert resumes it), each other model's final epoch; no epoch_latest.pt copy
    assert kept == {"seed": ["epoch_1.pt"], "baseline": ["epoch_2.pt"], "expert_000": ["epoch_2.pt"],
                    "expert_001": ["epoch_2.pt"]}


def test_a_run_whose_disk_cannot_hold_its_checkpoints_is_refused_before_training(tiny_run, tmp_path, monkeypatch):
    import os
    import shutil

    from experts.budget import DiskSpaceError
    from pipelines.core.config import load_config
    from pipelines.run.stages import run_stage

    run = tmp_path / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "split"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(DiskSpaceError, match=r"needs about .* GB on disk; 0.00 GB free at .*nothing was trained"):
        run_stage("train", load_config(tiny_run["config"]), run)
    assert not (run / "train" / "logs").exists()  # no trainer was launched
