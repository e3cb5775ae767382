"""The paper's ablations: Rand-n and one-step clustering, continuing the run's seed."""

import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.core.config import ConfigError, config_from_dict, load_config
from pipelines.run.ablations import run_ablation
from pipelines.run.stages import run_section

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ablated(tiny_run, tmp_path_factory):
    cfg = load_config(tiny_run["config"])
    for variant in ("random", "one_step"):
        run_ablation(variant, cfg, tiny_run["run_dir"])
    out = tmp_path_factory.mktemp("ablation_eval")  # the run's stages, evaluated with the ablations
    for folder in ("embed", "cluster", "split", "train", "ablations"):
        os.symlink(tiny_run["run_dir"] / folder, out / folder)
    # the test tasks stand in for a validation split here, only to exercise the path that reads one
    run_section("evaluate", dataclasses.replace(cfg.evaluate, ablations=["random", "one_step"]), out,
                dataclasses.replace(cfg.data, val_tasks=cfg.data.eval_tasks))
    return cfg, tiny_run["run_dir"], out / "evaluate"


def test_random_split_keeps_the_expert_sizes_but_not_the_clusters(ablated):
    _, run, _ = ablated
    main = pq.read_table(run / "cluster" / "assignments.parquet").to_pydict()
    rand = pq.read_table(run / "ablations" / "random" / "cluster" / "assignments.parquet").to_pydict()
    assert main["key"] == rand["key"]
    assert np.bincount(main["expert"]).tolist() == np.bincount(rand["expert"]).tolist()
    assert main["expert"] != rand["expert"]


def test_one_step_clusters_directly_into_experts(ablated):
    cfg, run, _ = ablated
    fine = np.load(run / "ablations" / "one_step" / "cluster" / "fine_centroids.npy")
    assert fine.shape[0] == cfg.cluster.num_experts


def test_ablations_continue_the_run_seed_instead_of_training_one(ablated):
    _, run, _ = ablated
    main = json.loads((run / "train" / "registry.json").read_text())
    for variant in ("random", "one_step"):
        registry = json.loads((run / "ablations" / variant / "train" / "registry.json").read_text())
        assert registry["seed"]["checkpoint"] == main["seed"]["checkpoint"]
        assert registry["baseline"] is None
        assert not (run / "ablations" / variant / "train" / "logs" / "seed").exists()


def test_report_has_ablation_rows_for_every_task(ablated):
    _, _, out = ablated
    results = json.loads((out / "results.json").read_text())
    assert results["rows"][-2:] == ["Rand-2 uniform ensemble", "one-step routed ensemble"]
    for task in results["tasks"].values():
        metric = "top1" if task["kind"] == "classification" else "i2t_r1"
        assert 0 <= task["Rand-2 uniform ensemble"][metric] <= 1
        assert 0 <= task["one-step routed ensemble"][metric] <= 1
    assert "| Rand-2 uniform ensemble |" in (out / "results.md").read_text()


def test_the_single_models_are_scored_on_the_validation_tasks(ablated):
    """What recipe settings are chosen on: the seed and the baseline on the validation split, with
    the same metrics as on the test tasks (here the same folders, so the same numbers)."""
    _, _, out = ablated
    results = json.loads((out / "results.json").read_text())
    assert results["lambda"]["MoDE"]["source"] == "validation"
    assert set(results["validation"]) == set(results["tasks"])
    for name, task in results["validation"].items():
        assert set(task) == {"kind", "seed", "baseline"}
        metric = "top1" if task["kind"] == "classification" else "i2t_r1"
        assert task["baseline"][metric] == results["tasks"][name]["baseline"][metric]


def test_unknown_ablation_is_rejected():
    with pytest.raises(ConfigError, match="evaluate.ablations"):
        config_from_dict({"evaluate": {"ablations": ["bagging"]}})
