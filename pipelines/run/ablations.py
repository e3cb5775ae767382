"""The paper's ablations, each a run folder of its own under runs/<name>/ablations/<variant>/.

`random` (Rand-n: the same expert sizes, samples dealt at random),
`one_step` (clustering straight into the experts, m = n), `experts=<k>`
(MoDE-k) and `fine=<m>` (m fine clusters) change the cluster stage; their
experts continue the run's own seed checkpoint, as the paper's ablations do.
Each shares the run's caption embeddings (a link to its embed stage), so
only cluster, split and the experts run again; a trainer-seed replicate
(pipelines/run/replicates.py) links the ablation's cluster and split to the
main run's too, and trains only the experts.

`expert_epochs=<e>` changes the expert phase's length within the same total
(issue #34's question: is one expert epoch after a long seed too short to
show anything?). It links the run's embed, cluster and split and trains the
experts and a matched baseline for `e` epochs from the seed's checkpoint at
epoch `seed_epochs + expert_epochs - e` of the same cosine schedule (kept by
`train.keep_seed_epochs`), so every length costs the same in total and its
experts are compared with a baseline that continued the same seed epoch.
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

# A variant of the cluster section links the parent's embed and runs the rest up to the experts; a
# variant of the expert phase (`expert_epochs=<e>`) links every shared stage and trains only.
LINKED = SHARED[:1]
CLUSTERED = SHARED[1:]
PHASE = "expert_epochs"


def clustered(variant: str) -> tuple[str, ...]:
    """The shared stages a variant runs again (none for another expert phase: the same clusters)."""
    return () if parse_ablation(variant)[0] == PHASE else CLUSTERED


def linked(variant: str) -> tuple[str, ...]:
    return SHARED[:len(SHARED) - len(clustered(variant))]


def variant_config(cfg: Config, variant: str) -> Config:
    """The run's config with the ablation's cluster stage (what its cluster and split depend on)."""
    kind, value = parse_ablation(variant)
    if kind == PHASE:
        return dataclasses.replace(cfg, name=f"{cfg.name}-{variant}",
                                   evaluate=dataclasses.replace(cfg.evaluate, ablations=[]),
                                   sweep=dataclasses.replace(cfg.sweep, experts=[]))
    cluster = {"random": dataclasses.replace(cfg.cluster, random_split=True),
               "one_step": dataclasses.replace(cfg.cluster, num_fine=cfg.cluster.num_experts),
               "experts": dataclasses.replace(cfg.cluster, num_experts=value or 0),
               "fine": dataclasses.replace(cfg.cluster, num_fine=value or 0)}[kind]
    return dataclasses.replace(cfg, name=f"{cfg.name}-{variant}", cluster=cluster,
                               evaluate=dataclasses.replace(cfg.evaluate, ablations=[]),
                               sweep=dataclasses.replace(cfg.sweep, experts=[]))


def phase_seed(cfg: Config, layout: RunLayout, expert_epochs: int) -> tuple[str, int]:
    """(checkpoint, epoch) of the run's seed that an expert phase of `expert_epochs` continues."""
    start = cfg.train.seed_epochs + cfg.train.expert_epochs - expert_epochs
    checkpoint = Path(read_registry(layout)["seed"]["checkpoint"]).with_name(f"epoch_{start}.pt")
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"{checkpoint} not found: the expert phase of {expert_epochs} epochs continues the seed from its "
            f"epoch {start}, which the seed did not keep (train.keep_seed_epochs lists {start} now, but the seed "
            f"trained before): delete {layout.train} to train the seed again, keeping it")
    return str(checkpoint), start


def ablation_config(cfg: Config, layout: RunLayout, variant: str) -> Config:
    """The run's config changed into one of the paper's ablations, continuing the run's seed."""
    variant_cfg = variant_config(cfg, variant)
    kind, value = parse_ablation(variant)
    if kind == PHASE:  # the experts and a matched baseline from an earlier epoch of the seed
        checkpoint, start = phase_seed(cfg, layout, value or 0)
        train = dataclasses.replace(cfg.train, seed_checkpoint=checkpoint, seed_epochs=start, expert_epochs=value,
                                    keep_seed_epochs=[], baseline=True)
        return dataclasses.replace(variant_cfg, train=train)
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
    run = DerivedRun.of(layout, ablation, ablation_config(cfg, layout, variant), linked(variant),
                        (*clustered(variant), TRAINER.name))
    if shared is None:
        return run
    links = run.links + tuple((ablation.stage(s), shared.ablation(variant).stage(s)) for s in clustered(variant))
    return DerivedRun(ablation, run.cfg, (TRAINER.name,), links)


def ablation_done(variant: str, cfg: Config, layout: RunLayout) -> bool:
    """Whether the ablation's cluster, split and experts are all done for this config (the flow then
    starts no sub-flow run for it)."""
    return layout.registry.is_file() and ablation_run(variant, cfg, layout).done()


def cluster_and_split(variant: str, cfg: Config, layout: RunLayout, hooks: Hooks = Hooks()) -> None:
    """Only the ablation's cluster and split (no seed needed): what a scaling sweep's points share."""
    DerivedRun.of(layout, layout.ablation(variant), variant_config(cfg, variant), LINKED, CLUSTERED).run(hooks)


def run_ablation(variant: str, cfg: Config, run_dir: str | Path | RunLayout | None, hooks: Hooks = Hooks(),
                 shared: RunLayout | None = None) -> dict:
    """Cluster, split and train one ablation; return its train manifest."""
    return ablation_run(variant, cfg, layout_of(cfg, run_dir), shared).run(hooks)[TRAINER.name]
