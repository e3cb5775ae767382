"""Evaluation images streamed from the shards: the same features in the same order whatever the
number of workers, nothing decoded kept, and each (model, task) pair encoded once per run folder."""

import os

import numpy as np
import pytest

import evaluation.image_stream as stream
from evaluation.clip_features import image_features, load_clip
from evaluation.tasks import load_tasks
from pipelines.core.config import load_config
from pipelines.run.stages import run_stage

pytestmark = pytest.mark.slow


def test_streamed_features_are_the_in_memory_ones_in_the_tasks_order_with_any_number_of_workers(tiny_run,
                                                                                             tiny_data):
    clip = load_clip(tiny_run["run_dir"] / "train" / "seed")
    task = next(t for t in load_tasks(tiny_data / "eval") if t.name == "digits")
    in_memory = image_features(clip, list(task.images.decoded()), batch_size=8)
    for workers in (0, 2):
        streamed = stream.stream_image_features(clip, task.images, batch_size=8, workers=workers)
        np.testing.assert_allclose(streamed, in_memory, atol=1e-5)


def test_a_task_holds_where_its_images_are_not_the_images(tiny_data):
    for task in load_tasks(tiny_data / "eval"):
        assert isinstance(task.images, stream.TaskImages)
        assert sum(task.images.counts) == task.images.total > 0


def test_rerunning_evaluate_encodes_no_image_twice(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "train"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    encoded = []
    real = stream.stream_image_features
    monkeypatch.setattr(stream, "stream_image_features",
                        lambda clip, images, *a: encoded.append(images.total) or real(clip, images, *a))
    cfg = load_config(tiny_run["config"])
    first = run_stage("evaluate", cfg, run)
    assert encoded, "the first evaluation encodes every (model, task) pair"
    encoded.clear()
    # another routing lambda: the evaluation reruns (its fingerprint changed), the images do not
    again = run_stage("evaluate", load_config(tiny_run["config"], overrides={"evaluate": {"lam": 0.4}}), run)
    assert not again.get("skipped") and encoded == []
    assert first["counts"]["images"] == again["counts"]["images"]
