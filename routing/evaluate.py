"""Stage 5, evaluate: zero-shot classification by the seed, each expert, and the ensembles.

For every held-out task the class names are embedded with the clustering's
caption encoder (averaged over the prompt templates), routed to experts with
routing/weights.py, and each model's cosine logits are combined. Rows of the
report: the seed, each expert, the uniform ensemble, the routed ensemble and
the oracle best expert (the best single expert chosen with the test labels,
an upper bound no router can be expected to reach). Every number is computed
from the run's own files.

Evaluation tasks live in one folder per task with a `task.json`:
    {"name": ..., "kind": "classification", "classnames": [...], "templates": ["a photo of a {}."]}
and tar shards whose samples hold `<key>.jpg` (or png) and `<key>.cls` (the
class index). Folders of another kind (retrieval) are listed but not scored
by this stage yet.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clustering.embed import encode, load_encoder
from pipelines.devices import pick_device
from pipelines.config import EmbedConfig, EvaluateConfig, section_hash
from pipelines.manifest import (
    atomic_write_json,
    atomic_write_text,
    combine,
    file_sha256,
    hash_outputs,
    is_done,
    read_manifest,
    require_manifest,
    write_manifest,
)
from pipelines.shards import expand_shards, iter_samples
from routing.ensemble import ensemble_logits, mean_per_class_accuracy, topk_accuracy
from routing.weights import route


@dataclass
class ClassificationTask:
    name: str
    classnames: list[str]
    templates: list[str]
    images: list[Image.Image]
    labels: np.ndarray


def load_tasks(tasks_dir: Path) -> tuple[list[ClassificationTask], list[str]]:
    """The classification tasks under `tasks_dir`, and the names of folders skipped."""
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"evaluation tasks folder {tasks_dir} not found (data.eval_tasks)")
    tasks, skipped = [], []
    for folder in sorted(p for p in tasks_dir.iterdir() if (p / "task.json").is_file()):
        spec = json.loads((folder / "task.json").read_text(encoding="utf-8"))
        if spec.get("kind") != "classification":
            skipped.append(folder.name)
            continue
        images, labels = [], []
        for shard in expand_shards(folder):
            for sample in iter_samples(shard):
                raw = sample.files.get("jpg") or sample.files.get("png")
                if raw is None or "cls" not in sample.files:
                    raise ValueError(f"{shard}: sample {sample.key!r} needs an image and a .cls label")
                images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
                labels.append(int(sample.files["cls"].decode().strip()))
        if not images:
            raise ValueError(f"{folder}: classification task has no samples")
        tasks.append(ClassificationTask(spec.get("name", folder.name), spec["classnames"],
                                        spec.get("templates", ["a photo of a {}."]), images,
                                        np.array(labels)))
    if not tasks:
        raise ValueError(f"{tasks_dir}: no classification task found (folders with task.json)")
    return tasks, skipped


def classname_embeddings(encoder, task: ClassificationTask) -> np.ndarray:
    """(C, d): each class name's caption-encoder embedding, averaged over templates."""
    texts = [t.format(c) for c in task.classnames for t in task.templates]
    vectors = encode(encoder, texts).reshape(len(task.classnames), len(task.templates), -1).mean(1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clip_logits(model_dir: Path, tasks: list[ClassificationTask], device: str, batch_size: int) -> list[np.ndarray]:
    """Cosine logits (N, C) of one local-dir CLIP on each task."""
    import open_clip
    import torch

    spec = f"local-dir:{model_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
    tokenizer = open_clip.get_tokenizer(spec)
    model.eval()
    out = []
    with torch.no_grad():
        for task in tasks:
            feats = []
            for i in range(0, len(task.images), batch_size):
                batch = torch.stack([preprocess(im) for im in task.images[i:i + batch_size]]).to(device)
                feats.append(torch.nn.functional.normalize(model.encode_image(batch), dim=-1))
            image = torch.cat(feats)
            classes = []
            for name in task.classnames:
                tokens = tokenizer([t.format(name) for t in task.templates]).to(device)
                text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).mean(0)
                classes.append(torch.nn.functional.normalize(text, dim=-1))
            out.append((image @ torch.stack(classes).T).float().cpu().numpy())
    return out


def scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "mean_per_class": mean_per_class_accuracy(logits, labels),
    }


def markdown_table(results: dict) -> str:
    """Rows = models and ensembles, columns = tasks (top-1 %), plus the mean."""
    tasks = list(results["tasks"])
    rows = results["rows"]
    lines = ["| model | " + " | ".join(tasks) + " | mean |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for row in rows:
        vals = [results["tasks"][t][row]["top1"] * 100 for t in tasks]
        lines.append(f"| {row} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {np.mean(vals):.1f} |")
    lines.append("")
    lines.append("Top-1 zero-shot accuracy (%) on held-out tasks. Routing weights per task (experts 0..n-1):")
    lines.append("")
    for t in tasks:
        w = ", ".join(f"{x:.3f}" for x in results["tasks"][t]["routing_weights"])
        lines.append(f"- {t}: [{w}] (chance {100 / results['tasks'][t]['num_classes']:.1f}%)")
    return "\n".join(lines) + "\n"


def run_evaluate(cfg: EvaluateConfig, embed_cfg: EmbedConfig, tasks_dir: Path, cluster_dir: Path,
                 train_dir: Path, stage_dir: Path) -> dict:
    started = time.time()
    upstream = require_manifest(train_dir, "train")
    cluster = require_manifest(cluster_dir, "cluster")
    config_hash = section_hash(cfg)
    task_files = sorted(str(p) for p in tasks_dir.rglob("*") if p.is_file()) if tasks_dir.is_dir() else []
    task_hash = combine([(Path(f).relative_to(tasks_dir).as_posix(), file_sha256(f)) for f in task_files])
    fingerprint = combine("evaluate", config_hash, section_hash(embed_cfg), upstream["fingerprint"],
                          cluster["fingerprint"], task_hash)
    if is_done(stage_dir, fingerprint):
        return {**read_manifest(stage_dir), "skipped": True}
    tasks, skipped = load_tasks(tasks_dir)
    registry = json.loads((train_dir / "registry.json").read_text(encoding="utf-8"))
    fine_centroids = np.load(cluster_dir / "fine_centroids.npy")
    expert_of_fine = np.load(cluster_dir / "expert_of_fine.npy")
    num_experts = len(registry["experts"])
    device = pick_device(cfg.device)

    encoder = load_encoder(embed_cfg.model, embed_cfg.pooling, device)
    routing = {}
    for task in tasks:
        class_emb = classname_embeddings(encoder, task)
        routing[task.name] = route(cfg.routing, class_emb, fine_centroids, expert_of_fine, num_experts, cfg.lam)
    del encoder

    model_names = ["seed"] + [e["model_dir"] for e in registry["experts"]]
    logits = {name: clip_logits(train_dir / name, tasks, device, cfg.batch_size)
              for name in tqdm(model_names, desc="evaluate", unit="model")}
    results: dict = {"routing": cfg.routing, "tasks": {}, "skipped_tasks": skipped}
    for t, task in enumerate(tasks):
        stacked = np.stack([logits[e["model_dir"]][t] for e in registry["experts"]])
        per_task = {"seed": scores(logits["seed"][t], task.labels)}
        for e in registry["experts"]:
            per_task[e["model_dir"]] = scores(logits[e["model_dir"]][t], task.labels)
        per_task["uniform ensemble"] = scores(
            ensemble_logits(stacked, np.full(num_experts, 1.0 / num_experts)), task.labels)
        per_task["routed ensemble"] = scores(ensemble_logits(stacked, routing[task.name]), task.labels)
        best = max((e["model_dir"] for e in registry["experts"]), key=lambda n: per_task[n]["top1"])
        per_task["oracle best expert"] = {**per_task[best], "expert": best}
        results["tasks"][task.name] = {
            **per_task, "routing_weights": routing[task.name].tolist(),
            "num_classes": len(task.classnames), "num_images": len(task.labels),
        }
    results["rows"] = model_names + ["uniform ensemble", "routed ensemble", "oracle best expert"]
    table = markdown_table(results)
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage_dir / "results.json", results)
    atomic_write_text(stage_dir / "results.md", table)
    outputs = [stage_dir / "results.json", stage_dir / "results.md"]
    return write_manifest(
        stage_dir, stage="evaluate", fingerprint=fingerprint, config_hash=config_hash,
        inputs={"train": upstream["fingerprint"], "cluster": cluster["fingerprint"], "tasks": task_hash},
        outputs=hash_outputs(stage_dir, outputs),
        counts={"tasks": len(tasks), "images": int(sum(len(t.labels) for t in tasks)),
                "models": len(model_names)},
        started=started, extra={"device": device},
    )
