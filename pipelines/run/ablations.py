"""The paper's ablations, each a run folder of its own under runs/<name>/ablations/<variant>/.

`random` (Rand-n: the same expert sizes, samples dealt at random),
`one_step` (clustering straight into the experts, m = n), `experts=<k>`
(MoDE-k) and `fine=<m>` (m fine clusters) change the cluster stage; their
experts continue the run's own seed checkpoint, as the paper's ablations do.
Each shares the run's caption embeddings (a link to its embed stage), so
only cluster, split and the experts run again; a trainer-seed replicate
(pipelines/run/replicates.py) links the ablation's cluster and split to the
main run's too, and trains only the experts.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from experts.pretrained import parse_pretrained
from experts.registry import read_registry
from pipelines.core.config import Config, parse_ablation
from pipelines.core.layout import RunLayout
from pipelines.core.stage import Hooks
from pipelines.run.stages import layout_of, run_stage, stage_done


def variant_config(cfg: Config, variant: str) -> Config:
    """The run's config with the ablation's cluster stage (what its cluster and split depend on)."""
    kind, value = parse_ablation(variant)
    cluster = {"random": dataclasses.replace(cfg.cluster, random_split=True),
               "one_step": dataclasses.replace(cfg.cluster, num_fine=cfg.cluster.num_experts),
               "experts": dataclasses.replace(cfg.cluster, num_experts=value or 0),
               "fine": dataclasses.replace(cfg.cluster, num_fine=value or 0)}[kind]
    return dataclasses.replace(cfg, name=f"{cfg.name}-{variant}", cluster=cluster,
                               evaluate=dataclasses.replace(cfg.evaluate, ablations=[]),
                               sweep=dataclasses.replace(cfg.sweep, experts=[]))


def ablation_config(cfg: Config, layout: RunLayout, variant: str) -> Config:
    """The run's config changed into one of the paper's ablations, continuing the run's seed."""
    variant_cfg = variant_config(cfg, variant)
    # A pretrained seed brought the run's architecture (train.model names another): the variant
    # builds the run's own, from its model_config folder
    model = f"local-dir:{layout.model_config.resolve()}" if parse_pretrained(cfg.train.seed_checkpoint) \
        else cfg.train.model
    train = dataclasses.replace(cfg.train, seed_checkpoint=read_registry(layout)["seed"]["checkpoint"],
                                baseline=False, model=model)
    return dataclasses.replace(variant_cfg, train=train)


def ablation_done(variant: str, cfg: Config, layout: RunLayout) -> bool:
    """Whether the ablation's cluster, split and experts are all done for this config (the flow then
    starts no sub-flow run for it)."""
    if not layout.registry.is_file():
        return False
    variant_cfg = ablation_config(cfg, layout, variant)
    return all(stage_done(stage, variant_cfg, layout.ablation(variant)) for stage in ("cluster", "split", "train"))


def link(target: Path, link_path: Path) -> None:
    """A relative symlink `link_path` -> `target` (a run folder stays movable)."""
    if not link_path.exists() and not link_path.is_symlink():
        link_path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(target, link_path.parent), link_path)


def cluster_and_split(variant: str, cfg: Config, layout: RunLayout, hooks: Hooks = Hooks()) -> None:
    """Only the ablation's cluster and split (no seed needed): what a scaling sweep's points share."""
    ablation = layout.ablation(variant)
    link(layout.embed, ablation.embed)
    for stage in ("cluster", "split"):
        run_stage(stage, variant_config(cfg, variant), ablation, hooks)


def run_ablation(variant: str, cfg: Config, run_dir: str | Path | RunLayout | None, hooks: Hooks = Hooks(),
                 shared: RunLayout | None = None) -> dict:
    """Cluster, split and train one ablation; return its train manifest. `shared`: another run whose
    ablation's cluster and split this one reuses (a trainer-seed replicate of it)."""
    layout = layout_of(cfg, run_dir)
    ablation = layout.ablation(variant)
    ablation.root.mkdir(parents=True, exist_ok=True)
    link(layout.embed, ablation.embed)
    if shared is not None:
        for stage in ("cluster", "split"):
            link(shared.ablation(variant).stage(stage), ablation.stage(stage))
    variant_cfg = ablation_config(cfg, layout, variant)
    manifests = {stage: run_stage(stage, variant_cfg, ablation, hooks) for stage in ("cluster", "split", "train")}
    return manifests["train"]
