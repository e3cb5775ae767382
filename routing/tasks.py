"""Held-out evaluation tasks: moda's own task folders, read into memory.

A task folder holds `task.json` ({"name", "kind": "classification",
"classnames", "templates"} or {"name", "kind": "retrieval"}) and tar shards
with `<key>.jpg` and `<key>.cls` (class index) or `<key>.txt` (caption).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.core.layout import TASK_FILE
from pipelines.shardio.shards import expand_shards, iter_samples


@dataclass
class Task:
    name: str
    kind: str  # "classification" or "retrieval"
    images: list[Image.Image]
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


def task_folders(tasks_dir: Path) -> list[Path]:
    """The task folders under `tasks_dir`: every folder not hidden. One without a task.json is an
    error, not skipped: a task lost without a word changes the report's mean (a generator killed
    mid-way leaves only hidden temporary folders)."""
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"evaluation tasks folder {tasks_dir} not found (data.eval_tasks)")
    folders = sorted(p for p in tasks_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    broken = [str(p) for p in folders if not (p / TASK_FILE).is_file()]
    if broken:
        raise ValueError(f"task folder(s) without a {TASK_FILE}: {broken}; regenerate them (moda synth) "
                         f"or move them out of {tasks_dir}")
    return folders


def load_tasks(tasks_dir: Path) -> list[Task]:
    """Every task folder under `tasks_dir`."""
    tasks = []
    for folder in task_folders(tasks_dir):
        spec = json.loads((folder / TASK_FILE).read_text(encoding="utf-8"))
        kind = spec.get("kind")
        if kind not in ("classification", "retrieval"):
            raise ValueError(f"{folder}/task.json: kind must be 'classification' or 'retrieval', got {kind!r}")
        need = "cls" if kind == "classification" else "txt"
        images, targets = [], []
        for shard in expand_shards(folder):
            for sample in iter_samples(shard):
                raw = sample.files.get("jpg") or sample.files.get("png")
                if raw is None or need not in sample.files:
                    raise ValueError(f"{shard}: sample {sample.key!r} needs an image and a .{need}")
                images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
                targets.append(sample.files[need].decode("utf-8").strip())
        if not images:
            raise ValueError(f"{folder}: task has no samples")
        name = spec.get("name", folder.name)
        if kind == "classification":
            tasks.append(Task(name, kind, images, labels=np.array([int(t) for t in targets]),
                              classnames=spec["classnames"],
                              templates=spec.get("templates", ["a photo of a {}."])))
        else:
            tasks.append(Task(name, kind, images, captions=targets))
    if not tasks:
        raise ValueError(f"{tasks_dir}: no task folders (with a task.json) found")
    return tasks
