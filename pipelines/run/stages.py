"""The list of stages, and running one of them for a whole config: no Prefect here.

`moda run`, `moda stage`, the Prefect flows and the deployments all iterate
`STAGES`; adding a stage is one new module that defines a `Stage` and one
entry here (and a deployment in prefect.yaml, to rerun it alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clustering import cluster, embed
from evaluation import evaluate
from experts import train
from experts.split import stage as split
from pipelines.core.config import Config, DataConfig
from pipelines.core.layout import RunLayout
from pipelines.core.stage import TRAINS, Hooks, Stage, StageContext, is_stage_done, upstream_manifests
from pipelines.core.stage import run_stage as run_one
from pipelines.shardio.remote import is_url
from pipelines.shardio.shards import expand_shards
from reporting import report

STAGES: tuple[Stage, ...] = (embed.STAGE, cluster.STAGE, split.STAGE, train.STAGE, evaluate.STAGE, report.STAGE)
BY_NAME = {stage.name: stage for stage in STAGES}
NAMES = tuple(BY_NAME)
# The stage derived runs train in (ablations, trainer-seed replicates, an added expert), and the
# stages before it, which a derived run links from its parent instead of running them again.
TRAINER = next(stage for stage in STAGES if stage.role == TRAINS)
SHARED = tuple(stage.name for stage in STAGES[:STAGES.index(TRAINER)])


def stage_named(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; stages are {list(NAMES)}")
    return BY_NAME[name]


def layout_of(cfg: Config, run_dir: str | Path | RunLayout | None) -> RunLayout:
    return run_dir if isinstance(run_dir, RunLayout) else RunLayout.of(cfg.name, run_dir)


def context(stage: Stage, cfg: Config, run_dir: str | Path | RunLayout | None, hooks: Hooks = Hooks(),
            section: Any = None) -> StageContext:
    """What `stage` gets from a whole config: its own section (or `section`), the data section,
    the layout and its upstream manifests (FileNotFoundError names a stage to run first)."""
    layout = layout_of(cfg, run_dir)
    return StageContext(section if section is not None else getattr(cfg, stage.section), cfg.data, layout,
                        upstream_manifests(stage, layout), hooks)


def run_stage(name: str, cfg: Config, run_dir: str | Path | RunLayout | None, hooks: Hooks = Hooks()) -> dict:
    """Run one stage (skipped when its fingerprint matches); return its manifest."""
    stage = stage_named(name)
    return run_one(stage, context(stage, cfg, run_dir, hooks))


def run_section(name: str, section: Any, layout: RunLayout | str | Path, data: DataConfig = DataConfig(),
                hooks: Hooks = Hooks()) -> dict:
    """Run one stage on a section of its own (no whole config): for tools and tests. `layout`: a
    RunLayout or a run folder."""
    stage = stage_named(name)
    layout = layout if isinstance(layout, RunLayout) else RunLayout(Path(layout))
    return run_one(stage, StageContext(section, data, layout, upstream_manifests(stage, layout), hooks))


def stage_done(name: str, cfg: Config, run_dir: str | Path | RunLayout | None) -> bool:
    """Whether `run_stage` would skip it: its outputs match its fingerprint (False when an upstream
    stage has not run). The `moda` flow asks first, so a finished stage costs no Prefect sub-flow run."""
    stage = stage_named(name)
    try:
        return is_stage_done(stage, context(stage, cfg, run_dir))
    except FileNotFoundError:
        return False


def check_inputs(cfg: Config) -> None:
    """Fail before any work when the config points at data that is not there."""
    expand_shards(cfg.data.train_shards, cfg.data.missing_shards)
    fixes = {"eval_tasks": "point it at a folder of task folders",
             "val_tasks": 'point it at a folder of task folders, or set it to "" for none'}
    for key, fix in fixes.items():
        for root in str(getattr(cfg.data, key)).split("::"):
            if root and not is_url(root) and not Path(root).is_dir():
                raise FileNotFoundError(f"data.{key}: folder {root} not found ({fix})")
