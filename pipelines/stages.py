"""The five stages as plain functions of (config, run folder): no Prefect here.

The Prefect flows (pipelines/flows.py) and `moda stage` both call
`run_stage`, so a stage run by hand, by a worker or by a test does the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

from pipelines.config import Config
from pipelines.manifest import is_done
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
              on_line: Callable[[str, str], None] | None = None, runner: Callable | None = None) -> dict:
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

        kwargs = {"runner": runner} if runner is not None else {}
        return run_train(cfg.train, paths["split"], paths["cluster"], paths["train"], on_line=on_line, **kwargs)
    if stage == "evaluate":
        from routing.evaluate import run_evaluate

        return run_evaluate(cfg.evaluate, paths["embed"], Path(cfg.data.eval_tasks), paths["cluster"],
                            paths["train"], paths["evaluate"],
                            ablations=[(v, ablation_dir(cfg, run_dir, v)) for v in cfg.evaluate.ablations])
    raise ValueError(f"unknown stage {stage!r}; stages are {list(STAGES)}")


def stage_fingerprint(stage: str, cfg: Config, run_dir: str | Path | None) -> str:
    """The fingerprint `run_stage` would give this stage now (FileNotFoundError: upstream not run)."""
    paths = run_paths(cfg, run_dir)
    if stage == "embed":
        from clustering.embed import embed_fingerprint

        return embed_fingerprint(cfg.embed, expand_shards(cfg.data.train_shards), stage_dir=paths["embed"])[0]
    if stage == "cluster":
        from clustering.cluster import cluster_fingerprint

        return cluster_fingerprint(cfg.cluster, paths["embed"])
    if stage == "split":
        from experts.split import split_fingerprint

        return split_fingerprint(cfg.split, expand_shards(cfg.data.train_shards), paths["cluster"],
                                 paths["embed"], paths["split"])[0]
    if stage == "train":
        from experts.train import train_fingerprint

        return train_fingerprint(cfg.train, paths["split"])[0]
    if stage == "evaluate":
        from routing.evaluate import evaluate_fingerprint

        return evaluate_fingerprint(cfg.evaluate, paths["embed"], Path(cfg.data.eval_tasks), paths["cluster"],
                                    paths["train"], [(v, ablation_dir(cfg, run_dir, v))
                                                     for v in cfg.evaluate.ablations])[0]
    raise ValueError(f"unknown stage {stage!r}; stages are {list(STAGES)}")


def stage_done(stage: str, cfg: Config, run_dir: str | Path | None) -> bool:
    """Whether `run_stage` would skip this stage: its outputs match its fingerprint.

    The `moda` flow asks first, so a finished stage costs no Prefect sub-flow run.
    """
    try:
        fingerprint = stage_fingerprint(stage, cfg, run_dir)
    except FileNotFoundError:  # an upstream stage has not run
        return False
    return is_done(run_paths(cfg, run_dir)[stage], fingerprint)


def ablation_dir(cfg: Config, run_dir: str | Path | None, variant: str) -> Path:
    return run_paths(cfg, run_dir)["root"] / "ablations" / variant


def ablation_config(cfg: Config, run_dir: str | Path | None, variant: str) -> Config:
    """The run's config changed into one of the paper's ablations, continuing the run's seed."""
    registry = json.loads((run_paths(cfg, run_dir)["train"] / "registry.json").read_text(encoding="utf-8"))
    if variant == "random":
        cluster = dataclasses.replace(cfg.cluster, random_split=True)
    elif variant == "one_step":
        cluster = dataclasses.replace(cfg.cluster, num_fine=cfg.cluster.num_experts)
    else:
        raise ValueError(f"unknown ablation {variant!r}; use 'random' or 'one_step'")
    train = dataclasses.replace(cfg.train, seed_checkpoint=registry["seed"]["checkpoint"], baseline=False)
    evaluate = dataclasses.replace(cfg.evaluate, ablations=[])
    return dataclasses.replace(cfg, name=f"{cfg.name}-{variant}", cluster=cluster, train=train,
                               evaluate=evaluate)


def run_ablation(variant: str, cfg: Config, run_dir: str | Path | None,
                 on_line: Callable[[str, str], None] | None = None) -> dict:
    """Cluster, split and train one ablation under runs/<name>/ablations/<variant>/.

    It shares the run's caption embeddings (a link to its embed stage) and
    its seed checkpoint, so only the experts are trained again.
    """
    root = ablation_dir(cfg, run_dir, variant)
    root.mkdir(parents=True, exist_ok=True)
    embed_link = root / "embed"
    if not embed_link.exists():
        os.symlink(os.path.relpath(run_paths(cfg, run_dir)["embed"], root), embed_link)
    variant_cfg = ablation_config(cfg, run_dir, variant)
    manifests = {}
    for stage in ("cluster", "split", "train"):
        manifests[stage] = run_stage(stage, variant_cfg, root, on_line=on_line)
    return manifests["train"]
