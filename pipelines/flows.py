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

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.exceptions import MissingContextError

from pipelines.config import Config, load_config
from pipelines.stages import STAGES, check_inputs, run_ablation, run_paths, run_stage, stage_done


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("moda")


def _artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def _artifact(create, *, key: str, **kwargs) -> None:
    """Publish an artifact when running inside a Prefect run; a no-op otherwise."""
    try:
        create(key=_artifact_key(key), **kwargs)
    except MissingContextError:
        pass


def _summarise(cfg: Config, stage: str, manifest: dict) -> None:
    log = _logger()
    state = "skipped (outputs match fingerprint)" if manifest.get("skipped") else f"done in {manifest['seconds']} s"
    log.info("%s: %s; counts %s", stage, state, json.dumps(manifest.get("counts", {})))
    if not manifest.get("skipped"):
        _artifact(create_markdown_artifact, key=f"{cfg.name}-{stage}",
                  markdown=f"## {stage}\n\n```json\n{json.dumps(manifest.get('counts', {}), indent=2)}\n```\n",
                  description=f"moda {stage} stage summary")


def _stage(stage: str, config_path: str, run_dir: str | None, on_line=None) -> tuple[Config, dict]:
    cfg = load_config(config_path)
    manifest = run_stage(stage, cfg, run_dir, on_line=on_line)
    _summarise(cfg, stage, manifest)
    return cfg, manifest


@flow(name="embed")
def embed_flow(config_path: str, run_dir: str | None = None) -> dict:
    return _stage("embed", config_path, run_dir)[1]


@flow(name="cluster")
def cluster_flow(config_path: str, run_dir: str | None = None) -> dict:
    cfg, manifest = _stage("cluster", config_path, run_dir)
    if manifest.get("skipped"):  # its artifacts were published by the run that made it
        return manifest
    report = json.loads((run_paths(cfg, run_dir)["cluster"] / "report.json").read_text())
    rows = [{"expert": e, "samples": n, "fine clusters": len(fines), "top terms": " ".join(terms)}
            for e, (n, fines, terms) in enumerate(zip(report["expert_sizes"], report["expert_fine_clusters"],
                                                      report["expert_top_terms"]))]
    _artifact(create_table_artifact, key=f"{cfg.name}-experts", table=rows,
              description="Expert sizes and the caption terms most typical of each")
    _artifact(create_markdown_artifact, key=f"{cfg.name}-cluster-balance", markdown=cluster_markdown(report),
              description="Cluster balance and inertia")
    return manifest


def cluster_markdown(report: dict) -> str:
    """The cluster report's balance figures as a short markdown table."""
    rows = [
        ("samples (fit sample)", f"{report['samples']} ({report['fit_sample']})"),
        ("fine imbalance factor, fit sample (balanced)", f"{report['fine_imbalance_on_sample']:.4f}"),
        ("fine imbalance factor, all data (nearest centre)", f"{report['fine_imbalance_all']:.4f}"),
        ("fine inertia per sample", f"{report['fine_inertia_per_sample']:.4f}"),
        ("expert sizes", ", ".join(str(n) for n in report["expert_sizes"])),
        ("largest / smallest expert", f"{report['expert_size_ratio']:.3f}"),
        ("expert spread (training priority)", ", ".join(f"{v:.3f}" for v in report["expert_spread"])),
    ]
    body = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Clustering\n\n| | |\n|---|---|\n{body}\n\nPlot: `cluster_sizes.png` in the cluster folder.\n"


@flow(name="split")
def split_flow(config_path: str, run_dir: str | None = None) -> dict:
    return _stage("split", config_path, run_dir)[1]


@task(name="train-expert", cache_policy=NO_CACHE)
def _train_expert(job):
    return job()


def _prefect_runner(jobs, concurrency: int):
    """Each expert a Prefect task; the GPU slots inside the jobs bound the concurrency."""
    futures = [_train_expert.with_options(task_run_name=getattr(job, "__name__", "expert")).submit(job)
               for job in jobs]
    return [future.result() for future in futures]


def _dask_runner(gpus_per_expert: int):
    """Each expert a Prefect task on the flow's Dask cluster, asking for its GPUs as a worker resource."""
    def run(jobs, concurrency: int):
        import dask

        futures = []
        for job in jobs:
            annotations = {"resources": {"GPU": gpus_per_expert}} if job.common["device"] == "cuda" else {}
            with dask.annotate(**annotations):
                futures.append(_train_expert.with_options(task_run_name=job.__name__).submit(job))
        return [future.result() for future in futures]
    return run


def _on_dask(cfg: Config) -> bool:
    """`train.executor: dask` and this flow really runs on Dask (the `moda` flow gives it the runner);
    otherwise experts stay on this host's GPU slots."""
    if cfg.train.executor != "dask":
        return False
    from prefect.context import FlowRunContext
    from prefect_dask import DaskTaskRunner

    context = FlowRunContext.get()
    if context is not None and isinstance(context.task_runner, DaskTaskRunner):
        return True
    _logger().warning("train.executor is dask, but this train flow was not started with a Dask task "
                      "runner (run it through the moda flow): training the experts on this host")
    return False


def dask_task_runner(cfg):
    """The Dask task runner for `train.executor: dask`: the cluster at `dask_address`, or a local one."""
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.dask_local_workers, "threads_per_worker": 1,
                                         "processes": True, "dashboard_address": None})


@flow(name="train", task_runner=ThreadPoolTaskRunner(max_workers=16))
def train_flow(config_path: str, run_dir: str | None = None) -> dict:
    from experts.train import PROGRESS

    log = _logger()
    cfg = load_config(config_path)
    progress: dict[str, float] = {}
    artifact_id = None
    try:
        artifact_id = create_progress_artifact(progress=0.0, key=_artifact_key(f"{cfg.name}-train-progress"),
                                               description="Share of the current training run done, per model")
    except MissingContextError:
        pass

    def on_line(name: str, line: str) -> None:
        match = PROGRESS.search(line)
        if match:
            progress[name] = int(match.group(2)) / max(1, int(match.group(3)))
            if artifact_id is not None:
                update_progress_artifact(artifact_id, progress=100 * sum(progress.values()) / len(progress))
        if match or "ERROR" in line or "Error" in line:
            log.info("[%s] %s", name, line)

    runner = _dask_runner(cfg.train.gpus_per_expert) if _on_dask(cfg) else _prefect_runner
    manifest = run_stage("train", cfg, run_dir, on_line=on_line, runner=runner)
    _summarise(cfg, "train", manifest)
    return manifest


@flow(name="evaluate")
def evaluate_flow(config_path: str, run_dir: str | None = None) -> dict:
    cfg, manifest = _stage("evaluate", config_path, run_dir)
    if manifest.get("skipped"):
        return manifest
    stage_dir = run_paths(cfg, run_dir)["evaluate"]
    _artifact(create_markdown_artifact, key=f"{cfg.name}-results", markdown=(stage_dir / "results.md").read_text(),
              description="MoDE evaluation: seed, baseline, experts, ensembles")
    results = json.loads((stage_dir / "results.json").read_text())
    rows = [{"task": t, **{f"expert {e}": round(w, 3) for e, w in enumerate(v["routing_weights"])}}
            for t, v in results["tasks"].items()]
    _artifact(create_table_artifact, key=f"{cfg.name}-routing", table=rows,
              description="Routing weights per task")
    return manifest


@flow(name="ablation")
def ablation_flow(config_path: str, variant: str, run_dir: str | None = None) -> dict:
    """One of the paper's ablations (random split, one-step clustering), from the run's seed."""
    cfg = load_config(config_path)
    manifest = run_ablation(variant, cfg, run_dir)
    _summarise(cfg, f"ablation {variant}", manifest)
    return manifest


@flow(name="add-expert")
def add_expert_flow(config_path: str, mode: str = "split-widest", new_data: str = "", task: str = "",
                    classnames: list[str] | None = None, templates: list[str] | None = None,
                    run_dir: str | None = None) -> dict:
    """Train one more expert and register it; existing experts' files are not touched.

    mode: `new-data` (train on the shards at `new_data`), `split-widest` (the
    wider half of the widest expert's fine clusters) or `task` (the nearest
    fine clusters of a task's class names: `task` folder or `classnames`).
    """
    from experts.add import AddRequest, run_add_expert

    cfg = load_config(config_path)
    request = AddRequest.from_dict({"mode": mode, "new_data": new_data, "task": task,
                                    "classnames": classnames or (), "templates": templates or ()})
    log = _logger()
    manifest = run_add_expert(cfg, request=request, run_dir=run_dir,
                              on_line=lambda name, line: log.info("[%s] %s", name, line)
                              if "Train Epoch" in line or "Error" in line else None)
    entry = manifest["expert"]
    state = "already added (skipped)" if manifest.get("skipped") else f"added in {manifest['seconds']} s"
    log.info("%s (%s): %s; %d samples, %d fine clusters", entry["name"], mode, state, entry["samples"],
             len(entry["fine_clusters"]))
    if not manifest.get("skipped"):
        detail = json.dumps(entry["selection"], indent=2)
        _artifact(create_markdown_artifact, key=f"{cfg.name}-{entry['name']}",
                  markdown=f"## {entry['name']} ({mode})\n\n{entry['samples']} training samples, fine clusters "
                           f"{entry['fine_clusters']}\n\n```json\n{detail}\n```\n",
                  description="An expert added to the MoDE system")
    return manifest


STAGE_FLOWS = {"embed": embed_flow, "cluster": cluster_flow, "split": split_flow,
               "train": train_flow, "evaluate": evaluate_flow}


@flow(name="moda")
def moda(config_path: str = "configs/demo.yaml", run_dir: str | None = None,
         stages: list[str] | None = None, add_expert: dict | None = None) -> str:
    """The whole MoDE pipeline; `stages` picks a subset (in pipeline order).

    `add_expert` (e.g. {"mode": "split-widest"}; the fields of
    `add_expert_flow`) adds one expert after the train stage's slot, before
    evaluate: the `moda/add-expert` deployment runs it with stages=[evaluate].
    Returns the results table (markdown) when the evaluate stage ran.
    """
    cfg = load_config(config_path)
    chosen = list(STAGES) if stages is None else list(stages)
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    check_inputs(cfg)
    paths = run_paths(cfg, run_dir)
    log = _logger()
    log.info("moda run %r into %s, stages %s", cfg.name, paths["root"], chosen)
    for stage in STAGES:
        if stage in chosen:
            if stage_done(stage, cfg, paths["root"]):  # no sub-flow run for a finished stage
                log.info("%s: skipped (outputs match fingerprint)", stage)
            elif stage == "train" and cfg.train.executor == "dask":  # experts on a Dask cluster
                train_flow.with_options(task_runner=dask_task_runner(cfg.train))(config_path, str(paths["root"]))
            else:
                STAGE_FLOWS[stage](config_path, str(paths["root"]))
        if stage == "train" and stage in chosen:
            for variant in cfg.evaluate.ablations:
                ablation_flow(config_path, variant, str(paths["root"]))
        if stage == "train" and add_expert:
            add_expert_flow(config_path, run_dir=str(paths["root"]), **add_expert)
    results = paths["evaluate"] / "results.md"
    if "evaluate" in chosen and results.is_file():
        table = results.read_text()
        log.info("results\n%s", table)
        return table
    return ""
