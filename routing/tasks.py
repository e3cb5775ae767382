"""Held-out evaluation tasks: moda's own task folders, read into memory.

A task folder holds `task.json` ({"name", "kind": "classification",
"classnames", "templates"} or {"name", "kind": "retrieval"}) and tar shards
with `<key>.jpg` and `<key>.cls` (class index) or `<key>.txt` (caption).
"""

from __future__ import annotations

import io
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.core.layout import TASK_FILE
from pipelines.shardio.shards import ShardError, expand_shards, iter_samples


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


class TaskError(ValueError):
    """A task folder that cannot be evaluated as it is; the message names the file, the key and the fix."""


def read_spec(folder: Path) -> dict:
    """task.json, checked: an object with a known kind, and for classification non-empty lists of
    class names and templates that each hold exactly one placeholder (`{}` or `{c}`)."""
    path = folder / TASK_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TaskError(f"{path}: not valid JSON ({err}); fix or regenerate it") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: must be a JSON object with \"kind\" (and \"classnames\", \"templates\"), "
                        f"got a {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in ("classification", "retrieval"):
        raise TaskError(f"{path}: kind must be 'classification' or 'retrieval', got {kind!r}")
    if "name" in spec and not isinstance(spec["name"], str):
        raise TaskError(f"{path}: name must be a string, got {spec['name']!r}")
    if kind == "classification":
        names = spec.get("classnames")
        if not isinstance(names, list) or not names or not all(isinstance(c, str) and c.strip() for c in names):
            raise TaskError(f"{path}: classnames must be a non-empty list of non-empty strings")
        templates = spec.get("templates", DEFAULT_TEMPLATES)
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
            raise TaskError(f"{path}: templates must be a non-empty list of strings")
        for template in templates:
            check_template(template, path)
    return spec


DEFAULT_TEMPLATES = ["a photo of a {}."]


def check_template(template: str, where: Path | str) -> None:
    """A template must hold the class name exactly once, as `{}` or `{c}`, and no other field: one
    without a placeholder gives every class the same text (chance, silently)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise TaskError(f"{where}: template {template!r} is not a format string ({err})") from None
    if fields not in ([""], ["c"]):
        raise TaskError(f"{where}: template {template!r} must hold the class name once, as {{}} or {{c}} "
                        f"(found {['{' + f + '}' for f in fields] or 'no placeholder'})")


def load_tasks(tasks_dir: Path) -> list[Task]:
    """Every task folder under `tasks_dir`, checked as it is read: a sample without its image or
    target, an image that does not decode, a class index that is not one of the task's classes
    are errors naming the task, the shard and the key (a test set must be whole: a dropped image
    would change the number being compared)."""
    tasks = []
    for folder in task_folders(tasks_dir):
        spec = read_spec(folder)
        kind = spec["kind"]
        need = "cls" if kind == "classification" else "txt"
        images, targets, keys = [], [], []
        for shard in expand_shards(folder):
            try:
                for sample in iter_samples(shard):
                    raw = sample.files.get("jpg") or sample.files.get("png")
                    if raw is None or need not in sample.files:
                        raise TaskError(f"{shard}: sample {sample.key!r} needs an image and a .{need}")
                    images.append(_image(raw, shard, sample.key))
                    targets.append(_text(sample.files[need], shard, sample.key, need))
                    keys.append(f"{shard.name}:{sample.key}")
            except ShardError as err:
                raise TaskError(f"{folder}: {err}; regenerate or replace the shard") from None
        if not images:
            raise TaskError(f"{folder}: task has no samples")
        name = spec.get("name", folder.name)
        if kind == "classification":
            labels = _labels(targets, keys, len(spec["classnames"]), folder)
            tasks.append(Task(name, kind, images, labels=labels, classnames=spec["classnames"],
                              templates=spec.get("templates", DEFAULT_TEMPLATES)))
        else:
            tasks.append(Task(name, kind, images, captions=targets))
    if not tasks:
        raise TaskError(f"{tasks_dir}: no task folders (with a task.json) found")
    return tasks


def _image(raw: bytes, shard: Path, key: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types for damaged data
        raise TaskError(f"{shard}: sample {key!r}: the image does not decode ({type(err).__name__}: {err}); "
                        "replace it or remove the sample") from None


def _text(raw: bytes, shard: Path, key: str, ext: str) -> str:
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TaskError(f"{shard}: sample {key!r}: its .{ext} is not UTF-8") from None
    if not text:
        raise TaskError(f"{shard}: sample {key!r}: its .{ext} is empty")
    return text


def _labels(targets: list[str], keys: list[str], classes: int, folder: Path) -> np.ndarray:
    labels = []
    for key, target in zip(keys, targets):
        if not target.lstrip("-").isdigit() or not 0 <= int(target) < classes:
            raise TaskError(f"{folder}: sample {key} has class {target!r}, not an index into the task's "
                            f"{classes} class names (0..{classes - 1})")
        labels.append(int(target))
    return np.array(labels, dtype=np.int64)
