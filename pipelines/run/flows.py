"""Prefect flows: the `moda` pipeline and one flow per stage, made from the list of stages.

The flows are thin: each loads the config, runs its stage (pipelines/run/
stages.py) with hooks that make independent jobs Prefect tasks (or Dask
tasks) and stream their progress into the flow's log and a progress artifact,
and publishes what the stage reports as artifacts. The stage functions own
the files and manifests, so `moda run` (in-process), `moda stage` (no
Prefect) and a deployment run on a worker do the same work, and a stage
whose fingerprint matches its manifest is skipped on rerun.
"""

from __future__ import annotations

import contextlib
import json

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.exceptions import MissingContextError
from prefect.task_runners import ThreadPoolTaskRunner

from experts.launch import run_gpus, visible_gpus
from pipelines.core.config import Config, load_config
from pipelines.core.devices import is_cuda, pick_device
from pipelines.core.stage import SCORES, TRAINS, Hooks, Report, Stage
from pipelines.run.ablations import ablation_done, cluster_and_split, run_ablation
from pipelines.run.add_expert import AddRequest, run_add_expert
from pipelines.run.executors import (
    DaskPool,
    RunCluster,
    dask_runner,
    dask_runner_of_flow,
    dask_task_runner,
    logger,
    on_dask,
    prefect_runner,
)
from pipelines.run.replicates import evaluate_replicate, replicate_done, train_replicate
from pipelines.run.stages import (
    BY_NAME,
    SHARED,
    STAGES,
    TRAINER,
    check_inputs,
    context,
    layout_of,
    run_stage,
    stage_done,
)
from pipelines.run.sweep import (
    extra_variants,
    gpu_shares,
    on_share,
    plan,
    point_config,
    prepare_point,
    run_done,
    run_scaling,
    waves,
)


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def _artifact(create, *, key: str, **kwargs) -> None:
    """Publish an artifact when running inside a Prefect run; a no-op otherwise."""
    try:
        create(key=artifact_key(key), **kwargs)
    except MissingContextError:
        pass


def publish(cfg: Config, report: Report) -> None:
    key = f"{cfg.name}-{report.key}"
    if report.table is not None:
        _artifact(create_table_artifact, key=key, table=report.table, description=report.description)
    if report.markdown is not None:
        _artifact(create_markdown_artifact, key=key, markdown=report.markdown, description=report.description)


def summarise(cfg: Config, stage: str, manifest: dict) -> None:
    log = logger()
    state = "skipped (outputs match fingerprint)" if manifest.get("skipped") else f"done in {manifest['seconds']} s"
    log.info("%s: %s; counts %s", stage, state, json.dumps(manifest.get("counts", {})))
    if not manifest.get("skipped"):
        counts = json.dumps(manifest.get("counts", {}), indent=2)
        publish(cfg, Report(stage, f"moda {stage} stage summary", markdown=f"## {stage}\n\n```json\n{counts}\n```\n"))


class ProgressArtifact:
    """A job's log lines into the flow's log (errors) and its share done into one progress artifact
    (the mean over the jobs seen so far), made on the first progress line."""

    def __init__(self, key: str):
        self.key, self.shares, self.artifact_id = key, {}, None

    def line(self, job: str, line: str) -> None:
        if "ERROR" in line or "Error" in line:
            logger().info("[%s] %s", job, line)

    def progress(self, job: str, share: float) -> None:
        first = job not in self.shares or share < self.shares[job]
        self.shares[job] = share
        if first:
            logger().info("[%s] started", job)
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(progress=0.0, key=artifact_key(self.key),
                                                            description="Share of the current runs done, per job")
            update_progress_artifact(self.artifact_id, progress=100 * sum(self.shares.values()) / len(self.shares))
        except MissingContextError:
            pass


def prefect_hooks(cfg: Config, stage: Stage) -> Hooks:
    """Jobs as Prefect tasks (on Dask when the flow runs on a Dask task runner: train's experts,
    every other stage's process jobs), lines and progress into the flow's log and artifacts."""
    progress = ProgressArtifact(f"{cfg.name}-{stage.name}-progress")
    dask = dask_runner_of_flow() if on_dask(cfg) else None
    distributed = stage.places_runs and dask is not None
    runner = dask_runner(cfg.train.gpus_per_expert) if distributed else prefect_runner
    pool = DaskPool(dask) if dask is not None and not stage.places_runs else None
    return Hooks(runner=runner, distributed=distributed, on_line=progress.line, on_progress=progress.progress,
                 pool=pool)


def stage_flow(stage: Stage):
    """The Prefect flow that runs `stage` alone (a sub-flow of `moda`)."""
    def run(config_path: str, run_dir: str | None = None, overrides: dict | None = None) -> dict:
        cfg = load_config(config_path, overrides)
        manifest = run_stage(stage.name, cfg, run_dir, prefect_hooks(cfg, stage))
        summarise(cfg, stage.name, manifest)
        if not manifest.get("skipped"):  # a skipped stage's artifacts were published by the run that made it
            for report in stage.reports(context(stage, cfg, run_dir), manifest):
                publish(cfg, report)
        return manifest
    run.__name__ = run.__qualname__ = f"{stage.name}_flow"
    run.__doc__ = f"The {stage.name} stage alone."
    return flow(name=stage.name, task_runner=ThreadPoolTaskRunner(max_workers=16))(run)


STAGE_FLOWS = {stage.name: stage_flow(stage) for stage in STAGES}


@flow(name="ablation")
def ablation_flow(config_path: str, variant: str, run_dir: str | None = None, overrides: dict | None = None) -> dict:
    """One of the paper's ablations (random split, one-step clustering, MoDE-k, m fine clusters),
    from the run's seed."""
    cfg = load_config(config_path, overrides)
    manifest = run_ablation(variant, cfg, run_dir, prefect_hooks(cfg, TRAINER))
    summarise(cfg, f"ablation {variant}", manifest)
    return manifest


@flow(name="replicate")
def replicate_flow(config_path: str, replicate: int, step: str, run_dir: str | None = None,
                   overrides: dict | None = None) -> dict:
    """Trainer-seed replicate `replicate` (train.seed + replicate): its training (`step` train: the seed,
    baseline, experts and ablations' experts) or its evaluation (`step` evaluate)."""
    cfg = load_config(config_path, overrides)
    layout = layout_of(cfg, run_dir)
    if BY_NAME[step].role == TRAINS:
        manifest = train_replicate(cfg, layout, replicate, prefect_hooks(cfg, TRAINER))
    else:
        manifest = evaluate_replicate(cfg, layout, replicate, step)
    summarise(cfg, f"replicate {replicate} {step}", manifest)
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
    cfg = load_config(config_path)
    request = AddRequest.from_dict({"mode": mode, "new_data": new_data, "task": task,
                                    "classnames": classnames or (), "templates": templates or ()})
    log = logger()
    progress = ProgressArtifact(f"{cfg.name}-add-expert-progress")
    manifest = run_add_expert(cfg, request=request, run_dir=run_dir,
                              hooks=Hooks(on_line=progress.line, on_progress=progress.progress))
    entry = manifest["expert"]
    state = "already added (skipped)" if manifest.get("skipped") else f"added in {manifest['seconds']} s"
    log.info("%s (%s): %s; %d samples, %d fine clusters", entry["name"], mode, state, entry["samples"],
             len(entry["fine_clusters"]))
    if not manifest.get("skipped"):
        detail = json.dumps(entry["selection"], indent=2)
        publish(cfg, Report(entry["name"], "An expert added to the MoDE system",
                            markdown=f"## {entry['name']} ({mode})\n\n{entry['samples']} training samples, fine "
                                     f"clusters {entry['fine_clusters']}\n\n```json\n{detail}\n```\n"))
    return manifest


@flow(name="moda")
def moda(config_path: str = "configs/demo.yaml", run_dir: str | None = None,
         stages: list[str] | None = None, add_expert: dict | None = None, overrides: dict | None = None) -> str:
    """The whole MoDE pipeline; `stages` picks a subset (in pipeline order).

    `overrides` ({"section": {"key": value}}) is laid over the config file
    (`moda run --set report.seeds=3`). With `report.seeds` K > 1, the train
    stage's slot also trains replicates 1..K-1 (another trainer seed each) and
    the evaluate stage's evaluates them; the report stage states every
    comparison over all K. `add_expert` (e.g. {"mode": "split-widest"}; the
    fields of `add_expert_flow`) adds one expert after the train stage's slot,
    before evaluate: the `moda/add-expert` deployment runs it with
    stages=[evaluate, report]. Returns the report (markdown) when the report
    stage ran, else the results table when evaluate did.
    """
    cfg = load_config(config_path, overrides)
    names = [stage.name for stage in STAGES]
    chosen = names if stages is None else list(stages)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {names}")
    check_inputs(cfg)
    layout = layout_of(cfg, run_dir)
    log = logger()
    log.info("moda run %r into %s, stages %s", cfg.name, layout.root, chosen)
    with contextlib.ExitStack() as stack:
        _run_stages(cfg, config_path, layout, chosen, add_expert, overrides, RunCluster(cfg.dask, stack))
    for stage in reversed(STAGES):  # the last chosen stage with a summary that exists
        if stage.name in chosen and stage.summary is not None and stage.summary(layout).is_file():
            table = stage.summary(layout).read_text()
            log.info("%s\n%s", stage.name, table)
            return table
    return ""


def _run_stages(cfg: Config, config_path: str, layout, chosen: list[str], add_expert: dict | None,
                overrides: dict | None, cluster: RunCluster) -> None:
    """The `moda` flow's stages in order, each a sub-flow (on the run's Dask cluster with `executor: dask`),
    with the ablations, replicates and added expert in their slots."""
    root, log = str(layout.root), logger()
    for stage in STAGES:
        name = stage.name
        if name in chosen:
            if stage_done(name, cfg, layout):  # no sub-flow run for a finished stage
                log.info("%s: skipped (outputs match fingerprint)", name)
            elif cfg.executor == "dask" and stage.on_cluster:
                STAGE_FLOWS[name].with_options(task_runner=dask_task_runner(cluster.address()))(
                    config_path, root, overrides)
            else:
                STAGE_FLOWS[name](config_path, root, overrides)
        if stage.role == TRAINS and name in chosen:
            for variant in cfg.evaluate.ablations:
                if ablation_done(variant, cfg, layout):
                    log.info("ablation %s: skipped (outputs match fingerprint)", variant)
                else:
                    ablation_flow(config_path, variant, root, overrides)
        for k in range(1, cfg.report.seeds):  # other trainer seeds: trained in the trainer's slot, scored in scoring's
            if stage.role in (TRAINS, SCORES) and name in chosen:
                if replicate_done(cfg, layout, k, name):
                    log.info("replicate %d %s: skipped (outputs match fingerprint)", k, name)
                else:
                    replicate_flow(config_path, k, name, root, overrides)
        if stage.role == TRAINS and add_expert:
            add_expert_flow(config_path, run_dir=root, **add_expert)


def train_point(config_path: str, root: str, point, run_name: str) -> None:
    """One sweep point: the `moda` flow in the point's folder with its overrides."""
    moda.with_options(flow_run_name=f"{run_name}-{point.name}")(config_path, root, overrides=point.overrides)


point_task = task(name="sweep-point")(train_point)


@flow(name="sweep", task_runner=ThreadPoolTaskRunner(max_workers=16))
def sweep(config_path: str = "configs/sweep-cpu.yaml", run_dir: str | None = None,
          overrides: dict | None = None) -> str:
    """The scaling-law sweep (pipelines/run/sweep.py): embed, cluster and split once, then every
    (model, budget) point as a `moda` sub-flow in its own run folder (a finished point is skipped, a
    killed one resumes), then the laws fitted to them (reporting/scaling_stage.py). Returns the
    scaling summary (markdown)."""
    cfg = load_config(config_path, overrides)
    check_inputs(cfg)
    layout = layout_of(cfg, run_dir)
    sweep_plan, variants = plan(cfg, overrides), extra_variants(cfg)
    log = logger()
    log.info("moda sweep %r into %s: %d points, systems %s", cfg.name, layout.root, len(sweep_plan.points),
             list(sweep_plan.systems))
    moda(config_path, str(layout.root), stages=list(SHARED), overrides=overrides)
    for variant in variants:  # MoDE-n's clusters, shared by every point
        cluster_and_split(variant, cfg, layout, prefect_hooks(cfg, BY_NAME[SHARED[-1]]))
    pending = []
    for i, point in enumerate(sweep_plan.points):
        folder = prepare_point(layout, point, variants)
        if run_done(point_config(config_path, point), folder):
            log.info("point %d/%d %s: skipped (every stage matches its fingerprint)", i + 1,
                     len(sweep_plan.points), point.name)
        else:
            pending.append(point)
    parallel = cfg.sweep.parallel_points
    device = pick_device(cfg.train.device)
    visible = visible_gpus() if is_cuda(device) else []
    shares = gpu_shares(run_gpus(device, cfg.train.gpus, visible), parallel, cfg.train.gpus_per_expert,
                        cfg.train.models_per_gpu)
    for wave in waves(pending, parallel):
        log.info("training %s", ", ".join(p.name for p in wave))
        if len(wave) == 1:
            train_point(config_path, str(layout.sweep_point(wave[0].name).root),
                        on_share(wave[0], shares[0], visible), cfg.name)
        else:  # each a task running the point's flow, on its own share of the GPUs (or a part of one)
            packing = [cfg.train.models_per_gpu // shares.count(share) for share in shares]
            futures = [point_task.submit(config_path, str(layout.sweep_point(p.name).root),
                                         on_share(p, share, visible, models), cfg.name)
                       for p, share, models in zip(wave, shares, packing)]
            for future in futures:
                future.result()
    manifest, published = run_scaling(sweep_plan, layout)
    summarise(cfg, "scaling", manifest)
    for report in published:
        publish(cfg, report)
    return layout.scaling_markdown.read_text(encoding="utf-8")
