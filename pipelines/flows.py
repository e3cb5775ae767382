"""Prefect flows: the `moda` pipeline and one flow per stage.

The flows are thin: each loads the config, hands its stage its own section
and the run folder, and publishes what a person would rather look at than
read as Prefect artifacts. The stage functions own the files and manifests,
so `moda run` (in-process) and a deployment run on a worker do the same work,
and a stage whose fingerprint matches its manifest is skipped on rerun.

Run folder layout: runs/<name>/{embed,cluster,split,train,evaluate}/.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import MissingContextError

from pipelines.config import Config, load_config
from pipelines.shards import expand_shards

STAGES = ("embed", "cluster", "split", "train", "evaluate")


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("moda")


def _artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def _summarise(cfg: Config, stage: str, manifest: dict) -> None:
    log = _logger()
    state = "skipped (outputs match fingerprint)" if manifest.get("skipped") else f"done in {manifest['seconds']} s"
    log.info("%s: %s; counts %s", stage, state, json.dumps(manifest.get("counts", {})))
    if manifest.get("skipped"):
        return
    try:
        create_markdown_artifact(
            key=_artifact_key(f"{cfg.name}-{stage}"),
            markdown=f"## {stage}\n\n```json\n{json.dumps(manifest.get('counts', {}), indent=2)}\n```\n",
            description=f"moda {stage} stage summary",
        )
    except MissingContextError:
        pass


def run_paths(cfg: Config, run_dir: str | None) -> dict[str, Path]:
    root = Path(run_dir or Path("runs") / cfg.name)
    return {stage: root / stage for stage in STAGES} | {"root": root}


@flow(name="embed")
def embed_flow(config_path: str, run_dir: str | None = None) -> dict:
    from clustering.embed import run_embed

    cfg = load_config(config_path)
    paths = run_paths(cfg, run_dir)
    manifest = run_embed(cfg.embed, expand_shards(cfg.data.train_shards), paths["embed"])
    _summarise(cfg, "embed", manifest)
    return manifest


@flow(name="cluster")
def cluster_flow(config_path: str, run_dir: str | None = None) -> dict:
    from clustering.cluster import run_cluster

    cfg = load_config(config_path)
    paths = run_paths(cfg, run_dir)
    manifest = run_cluster(cfg.cluster, paths["embed"], paths["cluster"])
    _summarise(cfg, "cluster", manifest)
    report = json.loads((paths["cluster"] / "report.json").read_text())
    rows = [{"expert": e, "samples": n, "fine clusters": len(fines), "top terms": " ".join(terms)}
            for e, (n, fines, terms) in enumerate(zip(report["expert_sizes"], report["expert_fine_clusters"],
                                                      report["expert_top_terms"]))]
    try:
        create_table_artifact(key=_artifact_key(f"{cfg.name}-experts"), table=rows,
                              description="Expert sizes and the caption terms most typical of each")
    except MissingContextError:
        pass
    return manifest


@flow(name="split")
def split_flow(config_path: str, run_dir: str | None = None) -> dict:
    from experts.split import run_split

    cfg = load_config(config_path)
    paths = run_paths(cfg, run_dir)
    manifest = run_split(cfg.split, expand_shards(cfg.data.train_shards), paths["embed"],
                         paths["cluster"], paths["split"])
    _summarise(cfg, "split", manifest)
    return manifest


@flow(name="train")
def train_flow(config_path: str, run_dir: str | None = None) -> dict:
    from experts.train import PROGRESS, run_train

    cfg = load_config(config_path)
    paths = run_paths(cfg, run_dir)
    log = _logger()

    def on_line(line: str) -> None:
        if PROGRESS.search(line) or "ERROR" in line or "Error" in line:
            log.info(line)

    manifest = run_train(cfg.train, paths["split"], paths["cluster"], paths["train"], on_line=on_line)
    _summarise(cfg, "train", manifest)
    return manifest


@flow(name="evaluate")
def evaluate_flow(config_path: str, run_dir: str | None = None) -> dict:
    from routing.evaluate import run_evaluate

    cfg = load_config(config_path)
    paths = run_paths(cfg, run_dir)
    manifest = run_evaluate(cfg.evaluate, cfg.embed, Path(cfg.data.eval_tasks), paths["cluster"],
                            paths["train"], paths["evaluate"])
    _summarise(cfg, "evaluate", manifest)
    table = (paths["evaluate"] / "results.md").read_text()
    try:
        create_markdown_artifact(key=_artifact_key(f"{cfg.name}-results"), markdown=table,
                                 description="MoDE zero-shot results: seed, experts, ensembles")
    except MissingContextError:
        pass
    return manifest


STAGE_FLOWS = {"embed": embed_flow, "cluster": cluster_flow, "split": split_flow,
               "train": train_flow, "evaluate": evaluate_flow}


def check_inputs(cfg: Config) -> None:
    """Fail before any work when the config points at data that is not there."""
    expand_shards(cfg.data.train_shards)
    if not Path(cfg.data.eval_tasks).is_dir():
        raise FileNotFoundError(f"data.eval_tasks: folder {cfg.data.eval_tasks} not found")


@flow(name="moda")
def moda(config_path: str = "configs/demo.yaml", run_dir: str | None = None,
         stages: list[str] | None = None) -> str:
    """The whole MoDE pipeline; `stages` picks a subset (in pipeline order).

    Returns the results table (markdown) when the evaluate stage ran.
    """
    cfg = load_config(config_path)
    chosen = list(stages) if stages else list(STAGES)
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    check_inputs(cfg)
    paths = run_paths(cfg, run_dir)
    log = _logger()
    log.info("moda run %r into %s, stages %s", cfg.name, paths["root"], chosen)
    for stage in STAGES:
        if stage in chosen:
            STAGE_FLOWS[stage](config_path, str(paths["root"]))
    results = paths["evaluate"] / "results.md"
    if "evaluate" in chosen and results.is_file():
        table = results.read_text()
        log.info("results\n%s", table)
        return table
    return ""
