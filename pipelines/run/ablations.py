"""The paper's ablations: Rand-n (experts on a random split) and one-step clustering (m = n).

Each is a run folder of its own under `runs/<name>/ablations/<variant>/`
that shares the run's caption embeddings (a link to its embed stage) and
continues the run's seed checkpoint, as the paper's ablations do, so only
cluster, split and the experts run again.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from experts.registry import read_registry
from pipelines.core.config import Config
from pipelines.core.layout import RunLayout
from pipelines.core.stage import Hooks
from pipelines.run.stages import layout_of, run_stage

VARIANTS = ("random", "one_step")


def ablation_config(cfg: Config, layout: RunLayout, variant: str) -> Config:
    """The run's config changed into one of the paper's ablations, continuing the run's seed."""
    registry = read_registry(layout)
    if variant == "random":
        cluster = dataclasses.replace(cfg.cluster, random_split=True)
    elif variant == "one_step":
        cluster = dataclasses.replace(cfg.cluster, num_fine=cfg.cluster.num_experts)
    else:
        raise ValueError(f"unknown ablation {variant!r}; use one of {list(VARIANTS)}")
    train = dataclasses.replace(cfg.train, seed_checkpoint=registry["seed"]["checkpoint"], baseline=False)
    evaluate = dataclasses.replace(cfg.evaluate, ablations=[])
    return dataclasses.replace(cfg, name=f"{cfg.name}-{variant}", cluster=cluster, train=train,
                               evaluate=evaluate)


def run_ablation(variant: str, cfg: Config, run_dir: str | Path | RunLayout | None,
                 hooks: Hooks = Hooks()) -> dict:
    """Cluster, split and train one ablation; return its train manifest."""
    layout = layout_of(cfg, run_dir)
    ablation = layout.ablation(variant)
    ablation.root.mkdir(parents=True, exist_ok=True)
    if not ablation.embed.exists():
        os.symlink(os.path.relpath(layout.embed, ablation.root), ablation.embed)
    variant_cfg = ablation_config(cfg, layout, variant)
    manifests = {stage: run_stage(stage, variant_cfg, ablation, hooks) for stage in ("cluster", "split", "train")}
    return manifests["train"]
