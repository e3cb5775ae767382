"""Linear probes on frozen image features: full and few-shot, C chosen on the train split only."""

import json
import os
import shutil

import numpy as np
import pytest

from evaluation.linear_probe import C_GRID, few_shot, probe
from pipelines.core.config import load_config
from pipelines.run.stages import run_stage


def blobs(n_per_class: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(classes, 16) * 4
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + rng.normal(0, 1, (len(y), 16)), y


def test_a_probe_separates_separable_classes_and_few_shot_takes_k_per_class():
    train_x, train_y = blobs(20, 3, 0)
    test_x, test_y = blobs(10, 3, 1)
    result = probe(train_x, train_y, test_x, test_y, shots=(1, 5))
    assert result["full"]["top1"] >= 0.95 and result["C"] in C_GRID
    assert set(result) == {"C", "full", "k1", "k5"}
    assert result["full"]["top5"] is None  # 3 classes: top-5 would read 100%
    idx = few_shot(train_y, 5, np.random.default_rng(0))
    assert np.bincount(train_y[idx]).tolist() == [5, 5, 5]


def test_top5_counts_a_hit_among_the_five_most_probable_classes_with_at_least_five_classes():
    train_x, train_y = blobs(20, 8, 0)
    test_x, test_y = blobs(10, 8, 1)
    result = probe(train_x, train_y, test_x, test_y, shots=())
    assert result["full"]["top1"] <= result["full"]["top5"] <= 1.0
    noise_x = np.random.default_rng(3).normal(0, 1, test_x.shape) * 0.01  # no signal: top-5 near 5/8
    chance = probe(train_x, train_y, noise_x, test_y, shots=())["full"]["top5"]
    assert 0.3 < chance < 0.95


def test_the_regularisation_is_chosen_without_the_test_split():
    train_x, train_y = blobs(20, 3, 0)
    a = probe(train_x, train_y, *blobs(10, 3, 1))
    b = probe(train_x, train_y, *blobs(10, 3, 2))
    assert a["C"] == b["C"]


@pytest.mark.slow
def test_evaluate_probes_every_model_and_the_experts_concatenated_on_tasks_with_a_train_split(
        tiny_run, tiny_data, tmp_path):
    tasks = tmp_path / "tasks"
    shutil.copytree(tiny_data / "eval" / "digits", tasks / "digits")
    shutil.copytree(tiny_data / "val" / "digits", tasks / "digits" / "train",
                    ignore=shutil.ignore_patterns("task.json"))  # the validation images as its train split
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "train"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    cfg = load_config(tiny_run["config"], overrides={"data": {"eval_tasks": str(tasks), "val_tasks": ""},
                                                     "evaluate": {"linear_probe": True}})
    run_stage("evaluate", cfg, run)
    results = json.loads((run / "evaluate" / "results.json").read_text())
    probes = results["linear_probe"]["digits"]
    assert set(probes) == {"seed", "baseline", "expert_000", "expert_001", "MoDE vision ensemble"}
    for row in probes.values():
        assert 0.0 <= row["full"]["top1"] <= 1.0 and {"k1", "k5", "k10"} <= set(row)
    assert "Linear probe `digits`" in (run / "evaluate" / "results.md").read_text()
    # and as clip_benchmark's linear_probe results, one per (model, shots)
    cb = json.loads((run / "evaluate" / "clip_benchmark" / "digits__seed__linear_probe.json").read_text())
    assert cb["task"] == "linear_probe" and cb["metrics"]["fewshot_k"] == -1
    assert cb["metrics"]["lp_acc1"] == probes["seed"]["full"]["top1"]
    assert cb["metrics"]["lp_acc5"] == probes["seed"]["full"]["top5"] is not None  # digits: 10 classes
    five = json.loads((run / "evaluate" / "clip_benchmark" / "digits__MoDE_vision_ensemble__linear_probe_5shot.json")
                      .read_text())
    assert five["metrics"]["fewshot_k"] == 5
    assert five["metrics"]["lp_mean_per_class_recall"] == probes["MoDE vision ensemble"]["k5"]["mean_per_class"]
