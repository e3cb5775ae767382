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

Task folders: routing/tasks.py. The report: routing/report.py.
Every number is computed from the run's own files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from clustering.encoder import encode, load_run_encoder
from experts.registry import added_fingerprint, current_added, load_experts, ownership, read_registry
from pipelines.core.config import EvaluateConfig, section_hash
from pipelines.core.devices import pick_device
from pipelines.core.manifest import (
    atomic_write_json,
    atomic_write_text,
    combine,
    file_sha256,
    hash_outputs,
    require_manifest,
)
from pipelines.core.stage import Fingerprint, Report, Stage, StageContext, StageResult
from routing.clip_features import classifier_weights, image_features, load_clip, text_features
from routing.ensemble import (
    ensemble_logits,
    ensemble_per_query,
    mean_per_class_accuracy,
    recall_at_k,
    topk_accuracy,
)
from routing.metadata import classname_embeddings
from routing.report import headline, markdown_report, plot_report
from routing.tasks import Task, load_tasks
from routing.weights import nearest_fine, ownership_matrix, route, route_each


def classification_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5),
            "mean_per_class": mean_per_class_accuracy(logits, labels)}


def retrieval_scores(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """i2t: (images, captions), t2i: (captions, images); pair i matches pair i."""
    return {"i2t_r1": recall_at_k(i2t, 1), "i2t_r5": recall_at_k(i2t, 5),
            "t2i_r1": recall_at_k(t2i, 1), "t2i_r5": recall_at_k(t2i, 5)}


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


def _jsonable(routing: dict) -> dict:
    out = {"weights": routing["weights"].tolist(), "metadata": routing["metadata"]}
    if "query_weights" in routing:
        out["query_weights"] = np.round(routing["query_weights"], 5).tolist()
    return out


def fingerprint(ctx: StageContext) -> Fingerprint:
    """Config, the embed, cluster and train stages, the task files, ablations and added experts."""
    layout, tasks_dir = ctx.layout, Path(ctx.data.eval_tasks)
    task_files = sorted(p for p in tasks_dir.rglob("*") if p.is_file()) if tasks_dir.is_dir() else []
    task_hash = combine([(p.relative_to(tasks_dir).as_posix(), file_sha256(p)) for p in task_files])
    ablation_fps = [(v, require_manifest(layout.ablation(v).train, f"train ({v} ablation)")["fingerprint"])
                    for v in ctx.section.ablations]
    config_hash = section_hash(ctx.section)
    up = {name: ctx.upstream[name]["fingerprint"] for name in ("embed", "train", "cluster")}
    value = combine("evaluate", config_hash, up["embed"], up["train"], up["cluster"], task_hash, ablation_fps,
                    added_fingerprint(layout))
    return Fingerprint(value, config_hash, {"train": up["train"], "cluster": up["cluster"], "tasks": task_hash})


def work(ctx: StageContext, fp: Fingerprint) -> StageResult:
    cfg: EvaluateConfig = ctx.section
    layout = ctx.layout
    tasks = load_tasks(Path(ctx.data.eval_tasks))
    registry = read_registry(layout)
    fine_centroids = np.load(layout.fine_centroids)
    all_experts = load_experts(layout)
    owns = ownership(all_experts, fine_centroids.shape[0])
    experts = [e.name for e in all_experts]
    device = pick_device(cfg.device)

    encoder = load_run_encoder(layout.embed, device)
    routing = {t.name: route_task(t, encoder, cfg, fine_centroids, owns, len(experts)) for t in tasks}
    del encoder

    singles = ["seed"] + (["baseline"] if registry.get("baseline") else []) + experts
    model_paths = {"seed": layout.model("seed"), "baseline": layout.model("baseline")}
    model_paths |= {e.name: e.path for e in all_experts}
    scores = {}
    for name in tqdm(singles, desc="evaluate", unit="model"):
        scores[name] = model_scores(load_clip(model_paths[name], device), tasks, cfg.batch_size)
    systems = []  # ablations: (row name, per-expert scores per task, routing per task or None)
    for variant in cfg.ablations:
        v_layout = layout.ablation(variant)
        v_registry = read_registry(v_layout)
        v_experts = [e["model_dir"] for e in v_registry["experts"]]
        v_scores = [model_scores(load_clip(v_layout.model(e), device), tasks, cfg.batch_size)
                    for e in v_experts]
        if variant == "random":  # a random split has no clusters to route by
            systems.append((f"Rand-{len(v_experts)} uniform ensemble", v_scores, None))
        else:
            v_fine = np.load(v_layout.fine_centroids)
            v_owner = np.load(v_layout.expert_of_fine)
            v_encoder = load_run_encoder(layout.embed, device)
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
    atomic_write_json(layout.results, results)
    atomic_write_json(layout.routing_log, {n: _jsonable(r) for n, r in routing.items()})
    atomic_write_text(layout.results_markdown, markdown_report(results))
    outputs = [layout.results, layout.routing_log, layout.results_markdown, *plot_report(results, layout)]
    return StageResult(
        outputs=hash_outputs(layout.evaluate, outputs),
        counts={"tasks": len(tasks), "images": int(sum(len(t.images) for t in tasks)), "models": len(singles),
                "added_experts": sum(e.added for e in all_experts),
                "stale_added_experts": len(current_added(layout)[1])},
        extra={"device": device},
    )


def reports(ctx: StageContext, manifest: dict) -> list[Report]:
    """The results table, and the routing weights per task."""
    results = json.loads(ctx.layout.results.read_text(encoding="utf-8"))
    rows = [{"task": t, **{f"expert {e}": round(w, 3) for e, w in enumerate(v["routing_weights"])}}
            for t, v in results["tasks"].items()]
    return [Report("results", "MoDE evaluation: seed, baseline, experts, ensembles",
                   markdown=ctx.layout.results_markdown.read_text(encoding="utf-8")),
            Report("routing", "Routing weights per task", table=rows)]


STAGE = Stage(name="evaluate", section="evaluate", reads=("embed", "cluster", "train"), fingerprint=fingerprint,
              work=work, reports=reports)
