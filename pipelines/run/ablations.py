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
from pathlib import Path

from experts.pretrained import parse_pretrained
from experts.registry import read_registry
from pipelines.core.config import Config, parse_ablation
from pipelines.core.layout import RunLayout
from pipelines.core.stage import Hooks
from pipelines.run.derived import DerivedRun
from pipelines.run.stages import SHARED, TRAINER, layout_of

# A variant changes the cluster section: it links the parent's embed and runs the rest up to the experts.
LINKED = SHARED[:1]
CLUSTERED = SHARED[1:]


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


def ablation_run(variant: str, cfg: Config, layout: RunLayout, shared: RunLayout | None = None) -> DerivedRun:
    """The ablation as a derived run of `layout`: the parent's embed linked, cluster, split and the
    experts run. `shared`: another run whose ablation's cluster and split this one links (a
    trainer-seed replicate of it), so it trains only the experts."""
    ablation = layout.ablation(variant)
    run = DerivedRun.of(layout, ablation, ablation_config(cfg, layout, variant), LINKED, (*CLUSTERED, TRAINER.name))
    if shared is None:
        return run
    links = run.links + tuple((ablation.stage(s), shared.ablation(variant).stage(s)) for s in CLUSTERED)
    return DerivedRun(ablation, run.cfg, (TRAINER.name,), links)


def ablation_done(variant: str, cfg: Config, layout: RunLayout) -> bool:
    """Whether the ablation's cluster, split and experts are all done for this config (the flow then
    starts no sub-flow run for it)."""
    return layout.registry.is_file() and DerivedRun.of(
        layout, layout.ablation(variant), ablation_config(cfg, layout, variant), LINKED,
        (*CLUSTERED, TRAINER.name)).done()


def cluster_and_split(variant: str, cfg: Config, layout: RunLayout, hooks: Hooks = Hooks()) -> None:
    """Only the ablation's cluster and split (no seed needed): what a scaling sweep's points share."""
    DerivedRun.of(layout, layout.ablation(variant), variant_config(cfg, variant), LINKED, CLUSTERED).run(hooks)


def run_ablation(variant: str, cfg: Config, run_dir: str | Path | RunLayout | None, hooks: Hooks = Hooks(),
                 shared: RunLayout | None = None) -> dict:
    """Cluster, split and train one ablation; return its train manifest."""
    return ablation_run(variant, cfg, layout_of(cfg, run_dir), shared).run(hooks)[TRAINER.name]
