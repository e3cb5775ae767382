"""The expert systems the evaluation scores, and the rows each adds: the run's experts (with any
added later) and each ablation's, with the routing geometry (fine centres, who owns them, the
experts' coarse centres) their router needs. An expert-phase variant (`expert_epochs=<e>`) also
has a baseline of its own, the row its ensembles and experts are compared with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.scorer import Scorer
from evaluation.tasks import Task
from experts.registry import load_experts, ownership, read_registry
from pipelines.core.config import parse_ablation
from pipelines.core.layout import RunLayout
from routing.systems import Router


def ablation_rows(variant: str, experts: int) -> list[tuple[str, bool]]:
    """(row name, routed) of each row an ablation adds."""
    kind, value = parse_ablation(variant)
    if kind == "random":  # a random split has no clusters to route by
        return [(f"Rand-{experts} uniform ensemble", False)]
    if kind == "one_step":
        return [("one-step routed ensemble", True)]
    if kind == "experts":
        return [(f"MoDE-{value} routed ensemble", True), (f"MoDE-{value} uniform ensemble", False)]
    if kind == "expert_epochs":  # its own matched baseline is a row too (phase_baseline)
        return [(f"{variant} routed ensemble", True), (f"{variant} uniform ensemble", False)]
    return [(f"MoDE-{experts} m={value} routed ensemble", True)]


def phase_baseline(variant: str) -> str | None:
    """The row of the single model an expert-phase variant's rows are compared with (None for others)."""
    return f"{variant} baseline" if parse_ablation(variant)[0] == "expert_epochs" else None


class System:
    """A set of experts and how they are routed: their models and the routing geometry."""

    def __init__(self, name: str, models: list[Path], router: Router):
        self.name, self.models, self.router = name, models, router

    def scores(self, tasks: list[Task], scorer: Scorer) -> list[np.ndarray]:
        """(n, N, K) stacked expert scores per task."""
        per_model = [scorer.model_scores(m, tasks) for m in self.models]
        return [np.stack([p[t] for p in per_model]) for t in range(len(tasks))]


def main_system(layout: RunLayout) -> tuple[System, list]:
    """The run's experts (and the current added ones)."""
    fine = np.load(layout.fine_centroids)
    experts = load_experts(layout)
    owns = ownership(experts, fine.shape[0])
    return System("MoDE", [e.path for e in experts], Router(fine, owns, coarse_centres(fine, owns))), experts


def ablation_system(layout: RunLayout, variant: str) -> System:
    v = layout.ablation(variant)
    registry = read_registry(v)
    fine = np.load(v.fine_centroids)
    owner = np.load(v.expert_of_fine)
    owns = owner[None, :] == np.arange(len(registry["experts"]))[:, None]
    return System(variant, [v.model(e["model_dir"]) for e in registry["experts"]],
                  Router(fine, owns, coarse_centres(fine, owns)))


def coarse_centres(fine: np.ndarray, owns: np.ndarray) -> np.ndarray:
    """Each expert's centre: the normalised mean of the fine centres it owns (added experts too)."""
    sums = owns.astype(np.float64) @ fine.astype(np.float64)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
