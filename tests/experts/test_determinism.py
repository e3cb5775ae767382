"""The same config and seeds give the same models and the same numbers (on a CPU, bit for bit)."""

import json
import os

import pytest

from pipelines.core.config import load_config
from pipelines.core.manifest import file_sha256
from pipelines.run.stages import run_stage

pytestmark = pytest.mark.slow


def test_training_the_same_config_twice_gives_identical_models_and_results(tiny_run, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    for stage in ("embed", "cluster", "split"):
        os.symlink(tiny_run["run_dir"] / stage, again / stage)
    cfg = load_config(tiny_run["config"])
    run_stage("train", cfg, again)
    run_stage("evaluate", cfg, again)
    for model in ("seed", "baseline", "expert_000", "expert_001"):
        weights = f"train/{model}/open_clip_model.safetensors"
        assert file_sha256(again / weights) == file_sha256(tiny_run["run_dir"] / weights), model
    first = json.loads((tiny_run["run_dir"] / "evaluate" / "results.json").read_text())
    second = json.loads((again / "evaluate" / "results.json").read_text())
    assert second["tasks"] == first["tasks"]
