"""Stage 5, evaluate: the routed ensemble against single models, on held-out tasks.

Rows of the report, for every task:
  seed                the shared starting point of all experts
  baseline            the fair single model: the seed continued on all data for
                      the same number of samples as all experts together
  expert_000, ...     each expert alone
  uniform ensemble    experts' logits averaged
  routed ensemble     experts' logits weighted by MoDE routing (routing/weights.py)
  oracle best expert  the best single expert picked with the test labels: an upper
                      bound for routing to one expert, not a fair competitor
  Rand-n uniform ensemble, one-step routed ensemble
                      the paper's ablations, when `evaluate.ablations` asks for them:
                      experts of the same sizes on a random split, and experts from
                      a one-step clustering (m = n); both continue the same seed

Classification tasks: class names (with prompt templates) are embedded with
the clustering's caption encoder and routed; metrics top-1, top-5 and mean
per-class accuracy. Retrieval tasks (image-caption pairs): image-to-text uses
one weight vector routed from the whole caption set, text-to-image routes
every query caption on its own (the paper's definitions); metrics R@1, R@5.

Task folders: `task.json` ({"name", "kind": "classification", "classnames",
"templates"} or {"name", "kind": "retrieval"}) plus tar shards with
`<key>.jpg` and `<key>.cls` (class index) or `<key>.txt` (caption).
Every number is computed from the run's own files.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clustering.embed import encode, load_run_encoder
from experts.registry import added_fingerprint, current_added, load_experts, ownership, read_registry
from pipelines.config import EvaluateConfig, section_hash
from pipelines.devices import pick_device
from pipelines.manifest import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    combine,
    file_sha256,
    hash_outputs,
    is_done,
    read_manifest,
    remove_stale_temps,
    require_manifest,
    write_manifest,
)
from pipelines.shards import expand_shards, iter_samples
from routing.clip_features import classifier_weights, image_features, load_clip, text_features
from routing.ensemble import (
    ensemble_logits,
    ensemble_per_query,
    mean_per_class_accuracy,
    recall_at_k,
    topk_accuracy,
)
from routing.metadata import classname_embeddings
from routing.weights import nearest_fine, ownership_matrix, route, route_each


@dataclass
class Task:
    name: str
    kind: str  # "classification" or "retrieval"
    images: list[Image.Image]
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


def load_tasks(tasks_dir: Path) -> list[Task]:
    """Every task folder (one with a task.json) under `tasks_dir`."""
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"evaluation tasks folder {tasks_dir} not found (data.eval_tasks)")
    tasks = []
    for folder in sorted(p for p in tasks_dir.iterdir() if (p / "task.json").is_file()):
        spec = json.loads((folder / "task.json").read_text(encoding="utf-8"))
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


def classification_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5),
            "mean_per_class": mean_per_class_accuracy(logits, labels)}


def retrieval_scores(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """i2t: (images, captions), t2i: (captions, images); pair i matches pair i."""
    return {"i2t_r1": recall_at_k(i2t, 1), "i2t_r5": recall_at_k(i2t, 5),
            "t2i_r1": recall_at_k(t2i, 1), "t2i_r5": recall_at_k(t2i, 5)}


def headline(kind: str) -> str:
    """The metric a task's verdict (and the oracle's choice) is stated in."""
    return "top1" if kind == "classification" else "i2t_r1"


def model_scores(clip, tasks: list[Task], batch_size: int) -> list[np.ndarray]:
    """Per task: (N, C) class logits, or (N, N) image-caption similarities."""
    out = []
    for task in tasks:
        images = image_features(clip, task.images, batch_size)
        if task.kind == "classification":
            out.append(images @ classifier_weights(clip, task.classnames, task.templates).T)
        else:
            out.append(images @ text_features(clip, task.captions, batch_size).T)
    return out


def ensemble_scores(task: Task, stacked: np.ndarray, routing: dict | None) -> dict[str, float]:
    """Metrics of an ensemble of experts' scores (n, N, K): routed, or uniform when routing is None."""
    uniform = np.full(stacked.shape[0], 1.0 / stacked.shape[0])
    weights = uniform if routing is None else routing["weights"]
    combined = ensemble_logits(stacked, weights)
    if task.kind == "classification":
        return classification_scores(combined, task.labels)
    if routing is None:
        return retrieval_scores(combined, combined.T)
    t2i = ensemble_per_query(np.transpose(stacked, (0, 2, 1)), routing["query_weights"])
    return retrieval_scores(combined, t2i)


def evaluate_task(task: Task, scores: dict[str, np.ndarray], experts: list[str], routing: dict,
                  ablations: list[tuple[str, np.ndarray, dict | None]] = ()) -> dict:
    """Every row's metrics on one task.

    scores: each single model's scores on the task; experts: the MoDE experts
    among them; routing: the task's MoDE routing; ablations: (row name,
    stacked expert scores, routing or None for uniform) of ablation systems.
    """
    rows: dict[str, dict] = {}
    for name, s in scores.items():
        rows[name] = classification_scores(s, task.labels) if task.kind == "classification" \
            else retrieval_scores(s, s.T)
    stacked = np.stack([scores[e] for e in experts])
    rows["uniform ensemble"] = ensemble_scores(task, stacked, None)
    rows["routed ensemble"] = ensemble_scores(task, stacked, routing)
    metric = headline(task.kind)
    best = max(experts, key=lambda e: rows[e][metric])
    rows["oracle best expert"] = {**rows[best], "expert": best}
    for name, ablation_stack, ablation_routing in ablations:
        rows[name] = ensemble_scores(task, ablation_stack, ablation_routing)
    return rows


def route_task(task: Task, encoder, cfg: EvaluateConfig, fine_centroids, ownership, n) -> dict:
    """Routing weights for one task, with the distances behind them for the log.

    ownership: the cluster stage's expert_of_fine (m,) or an (n, m) matrix
    (experts added later share fine clusters with the original ones).
    """
    if task.kind == "classification":
        meta = classname_embeddings(encoder, task.classnames, task.templates)
        names = task.classnames
    else:
        meta = encode(encoder, task.captions)
        names = task.captions
    owns = ownership_matrix(ownership, n)
    weights = route(cfg.routing, meta, fine_centroids, owns, n, cfg.lam)
    nearest, dist = nearest_fine(meta, fine_centroids)
    out = {
        "weights": weights,
        "metadata": [{"text": t, "nearest_fine": int(f), "owners": np.flatnonzero(owns[:, f]).tolist(),
                      "distance": round(float(d), 4)} for t, f, d in zip(names, nearest, dist)],
    }
    if task.kind == "retrieval":
        out["query_weights"] = route_each(cfg.routing, meta, fine_centroids, owns, n, cfg.lam)
    return out


def verdicts(results: dict) -> list[str]:
    """One plain sentence per task: did the routed ensemble beat the fair baseline?"""
    lines = []
    reference = "baseline" if "baseline" in results["rows"] else "seed"
    for name, task in results["tasks"].items():
        metric = headline(task["kind"])
        routed, base = task["routed ensemble"][metric] * 100, task[reference][metric] * 100
        delta = routed - base
        word = "beat" if delta > 0 else ("tied" if delta == 0 else "did not beat")
        lines.append(f"- {name}: MoDE (routed) {word} the {reference} on {metric}: "
                     f"{routed:.1f} vs {base:.1f} ({delta:+.1f} points)")
    return lines


def markdown_report(results: dict) -> str:
    rows = results["rows"]
    out = [f"# MoDE evaluation ({results['routing']} routing)", ""]
    cls = [t for t, v in results["tasks"].items() if v["kind"] == "classification"]
    ret = [t for t, v in results["tasks"].items() if v["kind"] == "retrieval"]
    if cls:
        out += ["Zero-shot top-1 accuracy (%):", "",
                "| model | " + " | ".join(cls) + " | mean |", "|---|" + "---:|" * (len(cls) + 1)]
        for row in rows:
            vals = [results["tasks"][t][row]["top1"] * 100 for t in cls]
            out.append(f"| {row} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {np.mean(vals):.1f} |")
        out.append("")
    for t in ret:
        out += [f"Retrieval `{t}` (recall %):", "", "| model | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 |",
                "|---|---:|---:|---:|---:|"]
        for row in rows:
            r = results["tasks"][t][row]
            out.append(f"| {row} | {r['i2t_r1'] * 100:.1f} | {r['i2t_r5'] * 100:.1f} | "
                       f"{r['t2i_r1'] * 100:.1f} | {r['t2i_r5'] * 100:.1f} |")
        out.append("")
    out += ["Verdict against the fair single model:", ""] + verdicts(results) + [""]
    out += ["Routing weights (experts 0..n-1):", ""]
    for t, v in results["tasks"].items():
        chance = f", chance top-1 {100 / v['num_classes']:.1f}%" if v["kind"] == "classification" else ""
        out.append(f"- {t}: [" + ", ".join(f"{w:.3f}" for w in v["routing_weights"]) + f"]{chance}")
    return "\n".join(out) + "\n"


def plot_report(results: dict, stage_dir: Path) -> list[Path]:
    """routing_weights.png (tasks x experts heatmap) and accuracy.png (per task and row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    weights = np.array([results["tasks"][t]["routing_weights"] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * weights.shape[1], 0.9 + 0.5 * len(tasks)))
    im = ax.imshow(weights, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(weights.shape[1]), [f"expert {e}" for e in range(weights.shape[1])], rotation=30)
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(weights.shape[1]):
            ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="routing weight")
    ax.set_title("MoDE routing weights")
    fig.tight_layout()
    paths = [stage_dir / "routing_weights.png", stage_dir / "accuracy.png"]
    with atomic_path(paths[0]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(tasks), 3.8))
    width = 0.8 / len(rows)
    for r, row in enumerate(rows):
        vals = [results["tasks"][t][row][headline(results["tasks"][t]["kind"])] * 100 for t in tasks]
        ax.bar(np.arange(len(tasks)) + r * width, vals, width, label=row)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2,
                  [f"{t}\n({headline(results['tasks'][t]['kind'])})" for t in tasks])
    ax.set_ylabel("%")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Held-out tasks")
    fig.tight_layout()
    with atomic_path(paths[1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return paths


def _jsonable(routing: dict) -> dict:
    out = {"weights": routing["weights"].tolist(), "metadata": routing["metadata"]}
    if "query_weights" in routing:
        out["query_weights"] = np.round(routing["query_weights"], 5).tolist()
    return out


def evaluate_fingerprint(cfg: EvaluateConfig, embed_dir: Path, tasks_dir: Path, cluster_dir: Path,
                         train_dir: Path, ablations: list[tuple[str, Path]] = ()) -> tuple[str, str]:
    """(fingerprint, hash of the task files): config, upstream stages, tasks, ablations, added experts."""
    task_files = sorted(p for p in tasks_dir.rglob("*") if p.is_file()) if tasks_dir.is_dir() else []
    task_hash = combine([(p.relative_to(tasks_dir).as_posix(), file_sha256(p)) for p in task_files])
    ablation_fps = [(v, require_manifest(d / "train", f"train ({v} ablation)")["fingerprint"])
                    for v, d in ablations]
    fingerprint = combine("evaluate", section_hash(cfg), require_manifest(embed_dir, "embed")["fingerprint"],
                          require_manifest(train_dir, "train")["fingerprint"],
                          require_manifest(cluster_dir, "cluster")["fingerprint"], task_hash, ablation_fps,
                          added_fingerprint(train_dir.parent))
    return fingerprint, task_hash


def run_evaluate(cfg: EvaluateConfig, embed_dir: Path, tasks_dir: Path, cluster_dir: Path,
                 train_dir: Path, stage_dir: Path, ablations: list[tuple[str, Path]] = ()) -> dict:
    started = time.time()
    upstream = require_manifest(train_dir, "train")
    cluster = require_manifest(cluster_dir, "cluster")
    config_hash = section_hash(cfg)
    run_root = train_dir.parent  # experts added later: runs/<name>/added/ (experts/registry.py)
    fingerprint, task_hash = evaluate_fingerprint(cfg, embed_dir, tasks_dir, cluster_dir, train_dir, ablations)
    if is_done(stage_dir, fingerprint):
        return {**read_manifest(stage_dir), "skipped": True}
    remove_stale_temps(stage_dir)  # what a killed run was writing
    tasks = load_tasks(tasks_dir)
    registry = read_registry(train_dir)
    fine_centroids = np.load(cluster_dir / "fine_centroids.npy")
    all_experts = load_experts(run_root)
    owns = ownership(all_experts, fine_centroids.shape[0])
    experts = [e.name for e in all_experts]
    device = pick_device(cfg.device)

    encoder = load_run_encoder(embed_dir, device)
    routing = {t.name: route_task(t, encoder, cfg, fine_centroids, owns, len(experts)) for t in tasks}
    del encoder

    singles = ["seed"] + (["baseline"] if registry.get("baseline") else []) + experts
    model_paths = {"seed": train_dir / "seed", "baseline": train_dir / "baseline"}
    model_paths |= {e.name: e.path for e in all_experts}
    scores = {}
    for name in tqdm(singles, desc="evaluate", unit="model"):
        scores[name] = model_scores(load_clip(model_paths[name], device), tasks, cfg.batch_size)
    systems = []  # ablations: (row name, per-expert scores per task, routing per task or None)
    for variant, variant_dir in ablations:
        v_registry = json.loads((variant_dir / "train" / "registry.json").read_text(encoding="utf-8"))
        v_experts = [e["model_dir"] for e in v_registry["experts"]]
        v_scores = [model_scores(load_clip(variant_dir / "train" / e, device), tasks, cfg.batch_size)
                    for e in v_experts]
        if variant == "random":  # a random split has no clusters to route by
            systems.append((f"Rand-{len(v_experts)} uniform ensemble", v_scores, None))
        else:
            v_fine = np.load(variant_dir / "cluster" / "fine_centroids.npy")
            v_owner = np.load(variant_dir / "cluster" / "expert_of_fine.npy")
            v_encoder = load_run_encoder(embed_dir, device)
            v_routing = {t.name: route_task(t, v_encoder, cfg, v_fine, v_owner, len(v_experts)) for t in tasks}
            systems.append(("one-step routed ensemble", v_scores, v_routing))
    results: dict = {"routing": cfg.routing, "lam": cfg.lam, "tasks": {},
                     "rows": singles + ["uniform ensemble", "routed ensemble", "oracle best expert"]
                     + [name for name, _, _ in systems]}
    for t, task in enumerate(tasks):
        ablation_rows = [(name, np.stack([per_expert[t] for per_expert in v_scores]),
                          None if v_routing is None else v_routing[task.name])
                         for name, v_scores, v_routing in systems]
        rows = evaluate_task(task, {n: scores[n][t] for n in singles}, experts, routing[task.name],
                             ablation_rows)
        results["tasks"][task.name] = {
            "kind": task.kind, **rows, "routing_weights": routing[task.name]["weights"].tolist(),
            "num_images": len(task.images),
            **({"num_classes": len(task.classnames)} if task.kind == "classification" else {}),
        }
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage_dir / "results.json", results)
    atomic_write_json(stage_dir / "routing.json", {n: _jsonable(r) for n, r in routing.items()})
    atomic_write_text(stage_dir / "results.md", markdown_report(results))
    outputs = [stage_dir / f for f in ("results.json", "routing.json", "results.md")]
    outputs += plot_report(results, stage_dir)
    return write_manifest(
        stage_dir, stage="evaluate", fingerprint=fingerprint, config_hash=config_hash,
        inputs={"train": upstream["fingerprint"], "cluster": cluster["fingerprint"], "tasks": task_hash},
        outputs=hash_outputs(stage_dir, outputs),
        counts={"tasks": len(tasks), "images": int(sum(len(t.images) for t in tasks)), "models": len(singles),
                "added_experts": sum(e.added for e in all_experts),
                "stale_added_experts": len(current_added(run_root)[1])},
        started=started, extra={"device": device},
    )
