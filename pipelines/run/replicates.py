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
from pipelines.run.ablations import ablation_done, run_ablation
from pipelines.run.derived import DerivedRun
from pipelines.run.stages import BY_NAME, SHARED, TRAINER


def replicate_config(cfg: Config, k: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + k))


def replicate_run(cfg: Config, layout: RunLayout, k: int, step: str) -> DerivedRun:
    """Replicate k as a derived run of `layout`: the shared stages linked, `step` (the trainer's or
    the scorer's stage) run under train.seed + k."""
    return DerivedRun.of(layout, layout.replicate(k), replicate_config(cfg, k), SHARED, (step,))


def train_replicate(cfg: Config, layout: RunLayout, k: int, hooks: Hooks = Hooks()) -> dict:
    """Replicate k's train stage and its ablations' experts; return its train manifest."""
    run = replicate_run(cfg, layout, k, TRAINER.name)
    manifest = run.run(hooks)[TRAINER.name]
    for variant in cfg.evaluate.ablations:
        run_ablation(variant, run.cfg, run.layout, hooks, shared=layout)
    return manifest


def replicate_done(cfg: Config, layout: RunLayout, k: int, step: str) -> bool:
    """Whether replicate k's `step` is done (its training: its train stage and its ablations)."""
    run = replicate_run(cfg, layout, k, step)
    trains = BY_NAME[step] is TRAINER
    return run.done() and (not trains or all(ablation_done(v, run.cfg, run.layout) for v in cfg.evaluate.ablations))


def evaluate_replicate(cfg: Config, layout: RunLayout, k: int, step: str) -> dict:
    """Replicate k's scoring stage (`step`), on the same tasks as the run."""
    return replicate_run(cfg, layout, k, step).run()[step]
