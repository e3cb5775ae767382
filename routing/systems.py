"""What the report compares, as pure functions of score arrays: single models, ensembles of
experts (uniform, or routed by one of three rules), their metrics and per-sample hits, and the
routing lambda chosen on validation tasks.

A task's scores are (N, C) class logits for classification and (N, T)
image-to-caption similarities for retrieval (caption j describes image
`caption_image[j]`; one caption per image in moda's own tasks, several in
clip_benchmark's). Metrics are clip_benchmark's: top-5 only with at least 5
classes (with fewer it is 100% whatever the model), recall@1/5/10 both ways
(each only with at least k candidates). An
ensemble is n experts' scores stacked (n, N, K) with weights (n,); for
text-to-image retrieval each query caption has its own weights (Q, n), as
the paper defines it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routing.ensemble import (
    ensemble_logits,
    ensemble_per_query,
    image_hits,
    mean_per_class_accuracy,
    text_hits,
    topk_accuracy,
    topk_hits,
)
from routing.weights import route, route_each

# The metric a task's verdict (and the oracle's choice) is stated in, and the per-sample hits kept.
HEADLINE = {"classification": "top1", "retrieval": "i2t_r1"}
RECALL_KS = (1, 5, 10)
HITS = {"classification": ("top1",), "retrieval": ("i2t_r1", "t2i_r1")}
# Lambdas tried on the validation tasks (the paper's 0.2 among them).
LAMBDAS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
ROUTINGS = ("paper", "released", "coarse")
# The report's row names for the main system's ensembles, spelled once (evaluation writes them, the
# report and the sweep read them).
UNIFORM = "uniform ensemble"
ROUTED = "routed ensemble"
RELEASED = "routed, released formula"
COARSE = "routed by coarse centres"
ORACLE = "oracle best expert"
ENSEMBLES = (UNIFORM, ROUTED, RELEASED, COARSE)


@dataclass(frozen=True)
class TaskView:
    """What scoring a task needs: its kind, labels (classification) or each caption's image (retrieval)."""

    name: str
    kind: str
    labels: np.ndarray
    caption_image: np.ndarray | None = None


@dataclass(frozen=True)
class Router:
    """An expert set's routing geometry: fine centres (m, d), ownership (n, m) (which fine
    clusters each expert owns), and the coarse (expert) centres (n, d)."""

    fine_centroids: np.ndarray
    owns: np.ndarray
    expert_centroids: np.ndarray

    @property
    def experts(self) -> int:
        return self.owns.shape[0]

    def weights(self, kind: str, meta: np.ndarray, rule: str, lam: float) -> dict:
        """{"weights": (n,), "query_weights": (Q, n) for retrieval} for a task's metadata embeddings.

        rule: `paper` or `released` over the fine centres (routing/weights.py), or `coarse`: the
        paper's formula over the experts' coarse centres (the paper's ablation).
        """
        if rule == "coarse":
            centres, owns, formula = self.expert_centroids, np.eye(self.experts, dtype=bool), "paper"
        else:
            centres, owns, formula = self.fine_centroids, self.owns, rule
        out = {"weights": route(formula, meta, centres, owns, self.experts, lam)}
        if kind == "retrieval":
            out["query_weights"] = route_each(formula, meta, centres, owns, self.experts, lam)
        return out


def single(task: TaskView, scores: np.ndarray) -> tuple[dict, dict]:
    """(metrics, per-sample hits) of one model's scores on a task."""
    return _scored(task, scores, scores.T if task.kind == "retrieval" else None)


def ensemble(task: TaskView, stacked: np.ndarray, routing: dict | None) -> tuple[dict, dict]:
    """(metrics, hits) of experts' stacked scores (n, N, K): weighted by `routing`, or uniform."""
    n = stacked.shape[0]
    weights = np.full(n, 1.0 / n) if routing is None else routing["weights"]
    combined = ensemble_logits(stacked, weights)
    if task.kind == "classification":
        return _scored(task, combined, None)
    if routing is None:
        return _scored(task, combined, combined.T)
    return _scored(task, combined, ensemble_per_query(np.transpose(stacked, (0, 2, 1)), routing["query_weights"]))


def _scored(task: TaskView, main: np.ndarray, t2i: np.ndarray | None) -> tuple[dict, dict]:
    if task.kind == "classification":
        metrics = {"top1": topk_accuracy(main, task.labels, 1),
                   "top5": topk_accuracy(main, task.labels, 5) if main.shape[1] >= 5 else None,
                   "mean_per_class": mean_per_class_accuracy(main, task.labels)}
        return metrics, {"top1": topk_hits(main, task.labels, 1)}
    owner = task.caption_image if task.caption_image is not None else np.arange(main.shape[0])
    # recall@k over fewer than k candidates is left out (clip_benchmark cannot compute it either)
    hits, metrics = {}, {}
    for k in RECALL_KS:
        hits[f"i2t_r{k}"] = text_hits(main, owner, k) if k <= main.shape[1] else None
        hits[f"t2i_r{k}"] = image_hits(t2i, owner, k) if k <= t2i.shape[1] else None
    metrics = {name: None if h is None else float(h.mean()) for name, h in hits.items()}
    return metrics, {"i2t_r1": hits["i2t_r1"], "t2i_r1": hits["t2i_r1"]}


def choose_lambda(tasks: list[TaskView], stacked: list[np.ndarray], metas: list[np.ndarray], router: Router,
                  rule: str = "paper", lambdas: tuple[float, ...] = LAMBDAS) -> tuple[float, dict[float, float]]:
    """The lambda whose routed ensemble scores best on these (validation) tasks, mean headline metric;
    ties go to the one nearest the paper's 0.2 (in log scale). Returns it and every lambda's score."""
    scores = {}
    for lam in lambdas:
        per_task = [ensemble(task, s, router.weights(task.kind, meta, rule, lam))[0][HEADLINE[task.kind]]
                    for task, s, meta in zip(tasks, stacked, metas)]
        scores[lam] = float(np.mean(per_task))
    best = max(scores.values())
    chosen = min((lam for lam, v in scores.items() if v >= best - 1e-12), key=lambda lam: abs(np.log(lam / 0.2)))
    return chosen, scores
