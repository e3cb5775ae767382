"""The five stages as plain functions of (config, run folder): no Prefect here.

The Prefect flows (pipelines/flows.py) and `moda stage` both call
`run_stage`, so a stage run by hand, by a worker or by a test does the same.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipelines.config import Config
from pipelines.shards import expand_shards

STAGES = ("embed", "cluster", "split", "train", "evaluate")


def run_paths(cfg: Config, run_dir: str | Path | None) -> dict[str, Path]:
    """runs/<name>/<stage> for every stage, plus "root"."""
    root = Path(run_dir or Path("runs") / cfg.name)
    return {stage: root / stage for stage in STAGES} | {"root": root}


def check_inputs(cfg: Config) -> None:
    """Fail before any work when the config points at data that is not there."""
    expand_shards(cfg.data.train_shards)
    if not Path(cfg.data.eval_tasks).is_dir():
        raise FileNotFoundError(f"data.eval_tasks: folder {cfg.data.eval_tasks} not found")


def run_stage(stage: str, cfg: Config, run_dir: str | Path | None,
              on_line: Callable[[str], None] | None = None) -> dict:
    """Run one stage (skipped inside when its fingerprint matches); return its manifest."""
    paths = run_paths(cfg, run_dir)
    if stage == "embed":
        from clustering.embed import run_embed

        return run_embed(cfg.embed, expand_shards(cfg.data.train_shards), paths["embed"])
    if stage == "cluster":
        from clustering.cluster import run_cluster

        return run_cluster(cfg.cluster, paths["embed"], paths["cluster"])
    if stage == "split":
        from experts.split import run_split

        return run_split(cfg.split, expand_shards(cfg.data.train_shards), paths["embed"],
                         paths["cluster"], paths["split"])
    if stage == "train":
        from experts.train import run_train

        return run_train(cfg.train, paths["split"], paths["cluster"], paths["train"], on_line=on_line)
    if stage == "evaluate":
        from routing.evaluate import run_evaluate

        return run_evaluate(cfg.evaluate, cfg.embed, Path(cfg.data.eval_tasks), paths["cluster"],
                            paths["train"], paths["evaluate"])
    raise ValueError(f"unknown stage {stage!r}; stages are {list(STAGES)}")
