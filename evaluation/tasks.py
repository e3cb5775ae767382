"""Held-out evaluation tasks, checked as they are read: moda's own task folders and clip_benchmark's.

A task keeps its labels or captions and where its images are (evaluation/image_stream.py streams
them for each model), never the decoded images: memory does not grow with a task's size.

A moda task folder holds `task.json` ({"name", "kind": "classification",
"classnames", "templates"} or {"name", "kind": "retrieval"}) and tar shards
with `<key>.jpg` (or webp/png/jpeg) and `<key>.cls` (class index) or
`<key>.txt` (caption). `"classnames": "imagenet1k"` takes open_clip's
ImageNet class names, with OpenAI's 80 templates (`"templates": "openai"`,
the default there) or the simple set (`"simple"`).

A clip_benchmark folder (`test/{0..n-1}.tar`, classnames.txt, ...; see
evaluation/clip_benchmark_format.py) is read as it is; its retrieval captions are
one per line, several per image.
"""

from __future__ import annotations

import dataclasses
import io
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation import clip_benchmark_format as cb
from evaluation.image_stream import IMAGE_EXTS, ImageError, TaskImages, image_bytes
from pipelines.core.layout import TASK_FILE
from pipelines.shardio.shards import ShardError, expand_shards, iter_samples
from routing.prompts import DEFAULT_TEMPLATES


@dataclass
class Task:
    name: str
    kind: str  # "classification" or "retrieval"
    images: TaskImages
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_image: np.ndarray | None = None  # retrieval: the image each caption describes
    folder: Path | None = None
    train_images: TaskImages | None = None  # classification: a train split for the linear probe
    train_labels: np.ndarray | None = None
    # After `without_unreadable`: which of the streamed images decode (the labels and captions above
    # are then those of the readable ones), and the ones that do not, listed.
    readable: np.ndarray | None = None
    train_readable: np.ndarray | None = None
    unreadable: list[dict] = field(default_factory=list)


def without_unreadable(task: Task, bad: list[dict], train_bad: list[dict] | None = None) -> Task:
    """`task` scored on its readable images only: labels (or captions, with the image each describes
    renumbered) of the images in `bad` (indices into its test images; `train_bad` into its train split)
    left out, every one listed in `unreadable` with its split. The images stay where they are: each
    model's features are streamed for all and the unreadable rows dropped (evaluation/evaluate.py)."""
    readable = np.ones(task.images.total, dtype=bool)
    readable[[b["index"] for b in bad]] = False
    out = dataclasses.replace(task, readable=readable, unreadable=[{**b, "split": "test"} for b in bad])
    if task.kind == "classification":
        out.labels = task.labels[readable]
    else:
        keep = readable[task.caption_image]
        out.captions = [c for c, k in zip(task.captions, keep) if k]
        out.caption_image = (np.cumsum(readable) - 1)[task.caption_image[keep]]
    if task.train_images is not None:
        train_readable = np.ones(task.train_images.total, dtype=bool)
        train_readable[[b["index"] for b in train_bad or []]] = False
        out.train_readable, out.train_labels = train_readable, task.train_labels[train_readable]
        out.unreadable += [{**b, "split": "train"} for b in train_bad or []]
    return out


def is_task(folder: Path) -> bool:
    return (folder / TASK_FILE).is_file() or cb.is_clip_benchmark(folder)


def task_folders(tasks_dir: Path) -> list[Path]:
    """The task folders under `tasks_dir` (every folder not hidden), or `tasks_dir` itself when it
    is one task. A folder that is neither a moda task (task.json) nor a clip_benchmark set is an
    error, not skipped: a task lost without a word changes the report's mean (a generator killed
    mid-way leaves only hidden temporary folders)."""
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"evaluation tasks folder {tasks_dir} not found (data.eval_tasks)")
    if is_task(tasks_dir):
        return [tasks_dir]
    folders = sorted(p for p in tasks_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    broken = [str(p) for p in folders if not is_task(p)]
    if broken:
        raise ValueError(f"task folder(s) with neither a {TASK_FILE} nor clip_benchmark's test/ split: {broken}; "
                         f"regenerate them (moda synth) or move them out of {tasks_dir}")
    return folders


class TaskError(ImageError):
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
        spec = builtin_metadata(spec, path)
        names = spec.get("classnames")
        if not isinstance(names, list) or not names or not all(isinstance(c, str) and c.strip() for c in names):
            raise TaskError(f"{path}: classnames must be a non-empty list of non-empty strings")
        templates = spec.get("templates", DEFAULT_TEMPLATES)
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
            raise TaskError(f"{path}: templates must be a non-empty list of strings")
        for template in templates:
            check_template(template, path)
    return spec


BUILTIN_CLASSNAMES = ("imagenet1k",)


def builtin_metadata(spec: dict, path: Path) -> dict:
    """`"classnames": "imagenet1k"` -> open_clip's 1,000 ImageNet class names, with OpenAI's 80
    templates (`"templates": "openai"`, the default) or its simple set (`"simple"`)."""
    names = spec.get("classnames")
    if not isinstance(names, str):
        return spec
    if names not in BUILTIN_CLASSNAMES:
        raise TaskError(f"{path}: classnames {names!r} is not a built-in set ({', '.join(BUILTIN_CLASSNAMES)}); "
                        "give a list of class names")
    from open_clip import zero_shot_metadata as meta

    templates = spec.get("templates", "openai")
    sets = {"openai": meta.OPENAI_IMAGENET_TEMPLATES, "simple": meta.SIMPLE_IMAGENET_TEMPLATES}
    if isinstance(templates, str):
        if templates not in sets:
            raise TaskError(f"{path}: templates {templates!r} is not a built-in set (openai, simple)")
        templates = [t("{c}") for t in sets[templates]]
    return {**spec, "classnames": list(meta.IMAGENET_CLASSNAMES), "templates": templates}


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


def task_roots(spec: str | Path) -> list[Path]:
    """`data.eval_tasks` / `data.val_tasks`: one folder, or several joined by `::` (moda's own tasks
    next to a folder of clip_benchmark sets, as open_clip joins training sources)."""
    return [Path(part) for part in str(spec).split("::") if part]


def load_tasks(spec: str | Path, check_images: bool = True) -> list[Task]:
    """Every task folder under the root(s) `spec` names, checked as it is read: a sample without its
    image or target, a class index that is not one of the task's classes are errors naming the task,
    the shard and the key; so is an image whose header PIL does not read, with `check_images` (without
    it, evaluation finds every image that does not decode, header or pixels, as it streams them, and
    counts and reports it: `evaluate.unreadable_images`). Two tasks of one name are an error."""
    tasks = [load_task(folder, check_images) for root in task_roots(spec) for folder in task_folders(root)]
    if not tasks:
        raise TaskError(f"{spec}: no task folders (with a task.json or clip_benchmark's test/) found")
    seen: dict[str, Path | None] = {}
    for task in tasks:
        if task.name in seen:
            raise TaskError(f"two evaluation tasks are named {task.name!r} ({seen[task.name]} and {task.folder}): "
                            "rename one (its task.json's name, or its folder)")
        seen[task.name] = task.folder
    return tasks


def task_spec(folder: Path) -> dict:
    """A task folder's metadata, moda's (task.json) or clip_benchmark's, checked, without reading
    its images: {"kind", "classnames", "templates", ...}."""
    if not is_task(folder):
        raise TaskError(f"{folder}: neither a moda task ({TASK_FILE}) nor a clip_benchmark set")
    try:
        spec = read_spec(folder) if (folder / TASK_FILE).is_file() else cb.read_spec(folder)
    except cb.FormatError as err:
        raise TaskError(str(err)) from None
    return {**spec, "templates": spec.get("templates") or DEFAULT_TEMPLATES} if spec["kind"] == "classification" \
        else spec


def load_task(folder: Path, check_images: bool = True) -> Task:
    """One task folder, moda's or clip_benchmark's, with its train split when it has one (a
    classification task's `train/`: the samples a linear probe is fitted on, never scored)."""
    own = (folder / TASK_FILE).is_file()
    try:
        spec = read_spec(folder) if own else cb.read_spec(folder)
        shards = expand_shards(folder) if own else cb.shard_paths(folder)
        train_dir = folder / cb.TRAIN_SPLIT
        has_train = spec["kind"] == "classification" and train_dir.is_dir() and any(train_dir.glob("*.tar*"))
        train_shards = (expand_shards(train_dir) if own else cb.shard_paths(folder, cb.TRAIN_SPLIT)) \
            if has_train else []
    except cb.FormatError as err:
        raise TaskError(str(err)) from None
    if not own and spec["kind"] == "classification":
        for template in spec["templates"]:
            check_template(template, folder / cb.TEMPLATES)
    kind = spec["kind"]
    images, targets, keys = _read_split(folder, shards, "cls" if kind == "classification" else "txt",
                                        check_images)
    name = spec.get("name", folder.name)
    if kind == "classification":
        classes = len(spec["classnames"])
        task = Task(name, kind, images, labels=_labels(targets, keys, classes, folder),
                    classnames=spec["classnames"], templates=spec.get("templates", DEFAULT_TEMPLATES),
                    folder=folder)
        if train_shards:
            task.train_images, train_targets, train_keys = _read_split(train_dir, train_shards, "cls",
                                                                             check_images)
            task.train_labels = _labels(train_targets, train_keys, classes, train_dir)
        return task
    # moda's own retrieval sets pair image i with caption i; clip_benchmark's give each image
    # several captions, one per line of its .txt (5 for COCO and Flickr).
    per_image = [[target] for target in targets] if own else [target.splitlines() for target in targets]
    per_image = [[c.strip() for c in group if c.strip()] for group in per_image]
    captions = [c for group in per_image for c in group]
    caption_image = np.repeat(np.arange(len(per_image)), [len(group) for group in per_image])
    return Task(name, kind, images, captions=captions, caption_image=caption_image, folder=folder)


def _read_split(folder: Path, shards: list[Path], need: str,
                check_images: bool = True) -> tuple[TaskImages, list[str], list[str]]:
    """A split's images (where they are), targets and keys, every sample checked."""
    counts, targets, keys = [], [], []
    for shard in shards:
        counts.append(0)
        try:
            for sample in iter_samples(shard):
                raw = image_bytes(sample.files)
                if raw is None or need not in sample.files:
                    raise TaskError(f"{shard}: sample {sample.key!r} needs an image and a .{need} "
                                    f"(images: {', '.join(IMAGE_EXTS)})")
                if check_images:
                    _check_image(raw, shard, sample.key)
                targets.append(_text(sample.files[need], shard, sample.key, need))
                keys.append(f"{shard.name}:{sample.key}")
                counts[-1] += 1
        except ShardError as err:
            raise TaskError(f"{folder}: {err}; regenerate or replace the shard") from None
    if not keys:
        raise TaskError(f"{folder}: task has no samples")
    return TaskImages(tuple(shards), tuple(counts)), targets, keys


def _check_image(raw: bytes, shard: Path, key: str) -> None:
    """An image PIL recognises, with a size (its header; the pixels are decoded when it is evaluated, where
    a truncated one is an error naming the same shard and key)."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.size  # noqa: B018 - reading the header is the check
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
