"""Scoring a model on evaluation tasks: each task's images streamed from its shards through the
image tower (features cached per model and task fingerprint, evaluation/image_stream.py), its class
names or captions through the text tower; and the images every model is scored on when some do
not decode (`evaluate.unreadable_images: skip`)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from tqdm import tqdm

from evaluation.clip_features import classifier_weights, load_clip, text_features
from evaluation.image_stream import cached_image_features
from evaluation.tasks import Task, without_unreadable
from pipelines.core.manifest import combine


class Scorer:
    """Scores models on tasks: images streamed from the shards (image features cached per model and
    task fingerprint under `cache`), class names and captions through the model's text tower.

    With `skip_unreadable`, `readable_tasks` first finds the images that do not decode and every
    model is then scored on the rest (each model decodes the same bytes, so the same images fail;
    a model that finds others is an error, never a silently different test set)."""

    def __init__(self, device: str, batch_size: int, workers: int, cache: Path | None,
                 task_hashes: dict[str, str], skip_unreadable: bool = False):
        self.device, self.batch_size, self.workers, self.cache = device, batch_size, workers, cache
        self.task_hashes, self.skip_unreadable = task_hashes, skip_unreadable

    def _features(self, clip, model_dir: Path, task: Task, split: str, bad: list[dict] | None) -> np.ndarray:
        task_hash = self.task_hashes.get(str(Path(task.folder).resolve()))
        images = task.images if split == "test" else task.train_images
        key = None if task_hash is None else (task_hash if split == "test" else combine(task_hash, split))
        return cached_image_features(clip, model_dir, images, key, self.cache if key else None,
                                     self.batch_size, self.workers, bad)

    def readable_tasks(self, model_dir: Path, tasks: list[Task], train_split: bool) -> list[Task]:
        """`tasks` without their unreadable images (evaluation/tasks.py `without_unreadable`), found by
        streaming `model_dir`'s features (cached: its own scores cost no second pass)."""
        if not self.skip_unreadable or not tasks:
            return tasks
        clip = load_clip(model_dir, self.device)
        out = []
        for task in tasks:
            bad: list[dict] = []
            self._features(clip, model_dir, task, "test", bad)
            train_bad: list[dict] = []
            if train_split and task.train_images is not None:
                self._features(clip, model_dir, task, "train", train_bad)
            out.append(without_unreadable(task, bad, train_bad))
            for entry in out[-1].unreadable[:3]:
                tqdm.write(f"evaluate: task {task.name!r}: left out {entry['shard']}:{entry['key']} ({entry['error']})")
            if len(out[-1].unreadable) > 3:
                tqdm.write(f"evaluate: task {task.name!r}: {len(out[-1].unreadable)} unreadable images left out in "
                           "all (results.json lists them)")
        return out

    def image_features(self, clip, model_dir: Path, task: Task, split: str = "test") -> np.ndarray:
        """(N, D) image features of a task's readable test (or train) images, from the cache when seen
        before."""
        bad: list[dict] | None = [] if self.skip_unreadable else None
        feats = self._features(clip, model_dir, task, split, bad)
        readable = task.readable if split == "test" else task.train_readable
        if readable is None:
            return feats
        if not np.array_equal(~np.isnan(feats).any(axis=1), readable):
            raise RuntimeError(f"{model_dir.name} could not decode other images of task {task.name!r} than the "
                               "first model did: the task's shards changed during evaluation; rerun it")
        return feats[readable]

    def model_scores(self, model_dir: Path, tasks: list[Task]) -> list[np.ndarray]:
        """Per task: (N, C) class logits, or (N, T) image-caption similarities."""
        clip = load_clip(model_dir, self.device)
        out = []
        for task in tasks:
            images = self.image_features(clip, model_dir, task)
            if task.kind == "classification":
                out.append(images @ classifier_weights(clip, task.classnames, task.templates).T)
            else:
                out.append(images @ text_features(clip, task.captions, self.batch_size).T)
        return out


def num_images(task: Task) -> int:
    """The task's images that are scored (all but the unreadable ones)."""
    return task.images.total if task.readable is None else int(task.readable.sum())


def warm_features(scorer: Scorer, device: str, model_dir: Path, tasks: list[Task], train_split: list[bool]) -> None:
    """A job: `model_dir`'s image features of `tasks` (and of the train split of each task whose
    `train_split` is set) computed on `device` into the scorer's cache, where the evaluate stage then
    finds them (on a Dask worker sharing the run folder)."""
    scorer = copy.copy(scorer)
    scorer.device = device
    clip = load_clip(model_dir, device)
    for task, train in zip(tasks, train_split):
        scorer._features(clip, model_dir, task, "test", [] if scorer.skip_unreadable else None)
        if train and task.train_images is not None:
            scorer._features(clip, model_dir, task, "train", [] if scorer.skip_unreadable else None)
