"""clip_benchmark's WebDataset layout, read as it is (its `wds_*` sets, DataComp's 38 tasks).

A dataset folder holds:

    <dataset>/test/nshards.txt           the number of shards, n
    <dataset>/test/0.tar ... (n-1).tar   <key>.webp|png|jpg|jpeg with <key>.cls (classification)
                                         or <key>.txt (retrieval: one caption per line)
    <dataset>/classnames.txt             one class name per line (classification)
    <dataset>/zeroshot_classification_templates.txt
                                         one template per line, placeholder {c}
    <dataset>/dataset_type.txt           "retrieval" (absent: classification)

as `clip_benchmark.webdataset_builder` writes it and `clip_benchmark.datasets.
builder.build_wds_dataset` reads it: the shards in number order, the first
image extension a sample has in that order, class names and templates
stripped line by line. Multi-label sets (`dataset_type.txt` "multilabel") are
not evaluated by moda and are refused by name.

This module only says what a folder holds (evaluation/tasks.py reads the samples)
and how a result is written in clip_benchmark's JSON format.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.core.layout import RunLayout
from pipelines.core.manifest import atomic_write_json, atomic_write_text

SPLIT = "test"
TRAIN_SPLIT = "train"  # optional: the samples a linear probe is fitted on
NSHARDS = "nshards.txt"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"


class FormatError(ValueError):
    """A clip_benchmark folder that cannot be evaluated as it is (the message names the file and the fix)."""


def is_clip_benchmark(folder: Path) -> bool:
    """A folder in clip_benchmark's layout: a `test/` split with nshards.txt or tar shards."""
    split = folder / SPLIT
    return split.is_dir() and ((split / NSHARDS).is_file() or any(split.glob("*.tar")))


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_spec(folder: Path) -> dict:
    """{"name", "kind", "classnames", "templates"} of a clip_benchmark folder, as moda's task.json says it."""
    kind = "classification"
    if (folder / DATASET_TYPE).is_file():
        kind = (_lines(folder / DATASET_TYPE) or ["classification"])[0].lower()
    if kind == "multilabel":
        raise FormatError(f"{folder / DATASET_TYPE}: multi-label sets are not evaluated by moda; move "
                          f"{folder.name} out of the evaluation tasks")
    if kind not in ("classification", "retrieval"):
        raise FormatError(f"{folder / DATASET_TYPE}: unknown dataset type {kind!r} (classification or retrieval)")
    spec = {"name": folder.name, "kind": kind}
    if kind == "classification":
        for name, key, what in ((CLASSNAMES, "classnames", "one class name per line, in label order"),
                                (TEMPLATES, "templates", "one prompt per line with {c} for the class name")):
            path = folder / name
            if not path.is_file():
                raise FormatError(f"{folder}: {name} not found; a zero-shot classification set needs it "
                                  f"({what})")
            spec[key] = _lines(path)
            if not spec[key]:
                raise FormatError(f"{path}: empty; write {what}")
    return spec


def shard_paths(folder: Path, split_name: str = SPLIT) -> list[Path]:
    """`test/0.tar` .. `test/(n-1).tar` in number order (n from nshards.txt, else the numbered tars there);
    `split_name="train"` for the train split a linear probe fits on. A shard that nshards.txt counts but
    that is not there is an error: a split must be whole."""
    split = folder / split_name
    if (split / NSHARDS).is_file():
        lines = _lines(split / NSHARDS)
        if len(lines) != 1 or not lines[0].isdigit() or int(lines[0]) < 1:
            raise FormatError(f"{split / NSHARDS}: must hold the number of shards, got {lines!r}")
        paths = [split / f"{i}.tar" for i in range(int(lines[0]))]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FormatError(f"{split}: {NSHARDS} counts {len(paths)} shards but {missing[:5]} are not there; "
                              "copy them or correct nshards.txt")
        return paths
    numbered = [p for p in split.glob("*.tar") if p.stem.isdigit()]
    return sorted(numbered, key=lambda p: int(p.stem))


CB_TASK = {"classification": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}


def cb_metrics(kind: str, metrics: dict) -> dict:
    """moda's metric names -> clip_benchmark's. Its `image_retrieval` is text-to-image (a caption
    retrieves images), `text_retrieval` image-to-text; acc5 is null below 5 classes (its NaN)."""
    if kind == "classification":
        return {"acc1": metrics["top1"], "acc5": metrics.get("top5"),
                "mean_per_class_recall": metrics["mean_per_class"]}
    out = {}
    for k in (1, 5, 10):
        out[f"image_retrieval_recall@{k}"] = metrics[f"t2i_r{k}"]
        out[f"text_retrieval_recall@{k}"] = metrics[f"i2t_r{k}"]
    return out


def cb_result(task: str, kind: str, model: str, metrics: dict, pretrained: str = "moda") -> dict:
    """One (model, task) result as clip_benchmark's `eval` writes it."""
    return {"dataset": task, "model": model, "pretrained": pretrained, "task": CB_TASK[kind],
            "metrics": cb_metrics(kind, metrics), "language": "en"}


def cb_probe_result(task: str, model: str, metrics: dict, shots: int, c: float, pretrained: str = "moda") -> dict:
    """One linear probe's result as clip_benchmark's `eval --task linear_probe` writes it (`fewshot_k`
    -1: the whole train split). Its probe is trained with SGD and a weight decay; moda's is
    scikit-learn's logistic regression, whose inverse regularisation `C` is recorded instead."""
    return {"dataset": task, "model": model, "pretrained": pretrained, "task": "linear_probe",
            "metrics": {"lp_acc1": metrics["top1"], "lp_acc5": metrics.get("top5"),
                        "lp_mean_per_class_recall": metrics["mean_per_class"], "fewshot_k": shots, "C": c},
            "language": "en"}


def main_metric(kind: str, metrics: dict) -> float:
    """DataComp's headline per task: acc1, or the mean of the two recall@1 for retrieval."""
    if kind == "classification":
        return metrics["top1"]
    return (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2


def write_field_formats(results: dict, layout: RunLayout) -> list[Path]:
    """Every (row, task) result as clip_benchmark's JSON (and every linear probe, as its
    `linear_probe` task writes them), the zero-shot ones also in results.jsonl; return
    the files written. The tools that read clip_benchmark's or DataComp's outputs read these."""
    lines, paths = [], []
    for task, entry in results["tasks"].items():
        kind = entry["kind"]
        for row in results["rows"]:
            metrics = {k: v for k, v in entry[row].items() if k != "expert"}
            path = layout.clip_benchmark_result(task, row)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, cb_result(task, kind, row, metrics))
            paths.append(path)
            field = {**cb_metrics(kind, metrics), "main_metric": main_metric(kind, metrics)}
            lines.append(json.dumps({"key": task, "dataset": task, "model": row, "metrics": field}))
    for task, rows_of in results.get("linear_probe", {}).items():
        for row, probed in rows_of.items():
            for shot, metrics in probed.items():
                if shot == "C":
                    continue
                k = -1 if shot == "full" else int(shot[1:])
                path = layout.clip_benchmark_result(task, f"{row}__linear_probe" + ("" if k < 0 else f"_{k}shot"))
                atomic_write_json(path, cb_probe_result(task, row, metrics, k, probed["C"]))
                paths.append(path)
    atomic_write_text(layout.results_jsonl, "\n".join(lines) + "\n")
    return [layout.results_jsonl, *paths]
