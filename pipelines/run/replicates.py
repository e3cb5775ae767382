"""Trainer seeds: the same recipe trained `report.seeds` times, so the report can say how much of a
difference is training noise.

Replicate 0 is the run itself. Replicate k (k >= 1) is a run folder of its
own, runs/<name>/seeds/replicate_<k>/, with train.seed + k: it links the
run's embed, cluster and split (they do not depend on the trainer seed),
trains its own seed, experts and baseline, and each ablation's experts from
its own seed (the ablation's cluster and split linked to the run's), and is
evaluated on the same tasks. The report stage reads all of them.
"""

from __future__ import annotations

import dataclasses

from pipelines.core.config import Config
from pipelines.core.layout import RunLayout
from pipelines.core.stage import Hooks
from pipelines.run.ablations import ablation_done, link, run_ablation
from pipelines.run.stages import run_stage, stage_done

SHARED = ("embed", "cluster", "split")


def replicate_config(cfg: Config, k: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + k))


def replicate_layout(layout: RunLayout, k: int) -> RunLayout:
    """Replicate k's run folder, its shared stages linked to the run's."""
    replica = layout.replicate(k)
    replica.root.mkdir(parents=True, exist_ok=True)
    for stage in SHARED:
        link(layout.stage(stage), replica.stage(stage))
    return replica


def train_replicate(cfg: Config, layout: RunLayout, k: int, hooks: Hooks = Hooks()) -> dict:
    """Replicate k's train stage and its ablations' experts; return its train manifest."""
    replica, replica_cfg = replicate_layout(layout, k), replicate_config(cfg, k)
    manifest = run_stage("train", replica_cfg, replica, hooks)
    for variant in cfg.evaluate.ablations:
        run_ablation(variant, replica_cfg, replica, hooks, shared=layout)
    return manifest


def replicate_done(cfg: Config, layout: RunLayout, k: int, step: str) -> bool:
    """Whether replicate k's training (its train stage and ablations) or its evaluation is done."""
    replica, replica_cfg = layout.replicate(k), replicate_config(cfg, k)
    if step == "evaluate":
        return stage_done("evaluate", replica_cfg, replica)
    return stage_done("train", replica_cfg, replica) and all(
        ablation_done(variant, replica_cfg, replica) for variant in cfg.evaluate.ablations)


def evaluate_replicate(cfg: Config, layout: RunLayout, k: int) -> dict:
    return run_stage("evaluate", replicate_config(cfg, k), replicate_layout(layout, k))
