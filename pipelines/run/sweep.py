"""The scaling sweep (`moda sweep`): a grid of (model, budget) points, each a whole MoDE run.

A point is the config with `train.model` one of `sweep.models` and a budget
of E epochs split into the seed's E x seed_share and the rest for the
single model (the fair baseline, continuing the seed's cosine on all data)
and the experts of every MoDE-n (`cluster.num_experts`, the point's own, and
an `experts=<n>` ablation for each other n). Its folder,
runs/<name>/sweep/<model>-e<E>/, links the run's embed, cluster and split
(they depend on neither the model nor the budget) and each ablation's
cluster and split to the run's own (runs/<name>/ablations/experts-<n>/,
clustered once), so the sweep embeds, clusters and splits once and trains,
evaluates and reports every point. Each point is then what `moda run` would
make of its config (the point's `overrides`), so every stage of it is
fingerprinted: a killed sweep, run again, skips the finished points and the
finished stages of the one it stopped in. With `sweep.parallel_points` P > 1
the points train P at a time, each on its own share of the visible GPUs
(`train.gpus`, a run-only field). The scaling stage
(reporting/scaling_stage.py) reads every point's report and fits the laws.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from pipelines.core.config import Config, DataConfig, load_config
from pipelines.core.layout import RunLayout
from pipelines.core.stage import Hooks, Report, StageContext
from pipelines.core.stage import run_stage as run_one
from pipelines.run.ablations import ablation_done
from pipelines.run.derived import DerivedRun
from pipelines.run.replicates import replicate_done
from pipelines.run.stages import NAMES, SHARED, STAGES, stage_done
from reporting.scaling_stage import SINGLE, SweepPlan, SweepPoint
from reporting.scaling_stage import STAGE as SCALING
from routing.systems import ROUTED


def model_slug(model: str) -> str:
    """A model's name in a folder name: `experts/model_configs/moda-tiny.json` -> `moda-tiny`,
    `ViT-B-32` -> `ViT-B-32`, `local-dir:/models/x` -> `x`."""
    name = Path(model.removeprefix("local-dir:").rstrip("/")).name
    name = name[:-5] if name.endswith(".json") else name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "model"


def extra_variants(cfg: Config) -> list[str]:
    """The `experts=<n>` ablations of every MoDE-n but the points' own."""
    return [f"experts={n}" for n in cfg.sweep.experts if n != cfg.cluster.num_experts]


def systems(cfg: Config) -> dict[str, str]:
    """System label -> the evaluation row that scores it at every point."""
    out = {SINGLE: "baseline"}
    for n in sorted(set(cfg.sweep.experts) | {cfg.cluster.num_experts}):
        out[f"MoDE-{n}"] = ROUTED if n == cfg.cluster.num_experts else f"MoDE-{n} {ROUTED}"
    return out


def points(cfg: Config, user_overrides: dict | None = None) -> list[SweepPoint]:
    """Every (model, budget) point, smallest model and budget first, with the overrides that make the
    config file (and the user's own `overrides`) into the point's config."""
    user = dict(user_overrides or {})
    out = []
    for model in cfg.sweep.models or [cfg.train.model]:
        for epochs in sorted(cfg.sweep.epochs):
            seed = round(epochs * cfg.sweep.seed_share)
            name = f"{model_slug(model)}-e{epochs}"
            mine = {"name": f"{cfg.name}-{name}",
                    "train": {"model": model, "seed_epochs": seed, "expert_epochs": epochs - seed,
                              "baseline": True, "seed_checkpoint": ""},
                    "evaluate": {"ablations": extra_variants(cfg)}}
            overrides = {**user, **{k: {**user.get(k, {}), **v} if isinstance(v, dict) else v
                                    for k, v in mine.items()}}
            out.append(SweepPoint(name=name, model=model, epochs=epochs, seed_epochs=seed, overrides=overrides))
    if len({p.name for p in out}) != len(out):
        raise ValueError(f"sweep.models {cfg.sweep.models}: two models have the same folder name; give them "
                         "distinct file or folder names")
    return out


def plan(cfg: Config, user_overrides: dict | None = None) -> SweepPlan:
    return SweepPlan(sweep=cfg.sweep, points=tuple(points(cfg, user_overrides)), systems=systems(cfg),
                     variants=tuple(extra_variants(cfg)), seeds=cfg.report.seeds)


def point_config(config_path: str | Path, point: SweepPoint) -> Config:
    return load_config(config_path, point.overrides)


def prepare_point(layout: RunLayout, point: SweepPoint, variants: list[str]) -> RunLayout:
    """The point's run folder, its shared stages linked to the run's (made once, before any point)."""
    folder = layout.sweep_point(point.name)
    links = [(folder.stage(s), layout.stage(s)) for s in SHARED]
    links += [(folder.ablation(v).stage(s), layout.ablation(v).stage(s)) for v in variants for s in SHARED]
    return DerivedRun(folder, None, (), tuple(links)).prepare()


def run_done(cfg: Config, layout: RunLayout) -> bool:
    """Whether every stage of a run (its ablations and trainer-seed replicates too) matches its
    fingerprint: the sweep then starts nothing for the point."""
    return (all(stage_done(name, cfg, layout) for name in NAMES)
            and all(ablation_done(v, cfg, layout) for v in cfg.evaluate.ablations)
            and all(replicate_done(cfg, layout, k, stage.name) for k in range(1, cfg.report.seeds)
                    for stage in STAGES if stage.role))


def gpu_shares(visible: list[str], parallel: int, per_expert: int, models_per_gpu: int = 1) -> list[list[str]]:
    """Shares of the visible GPUs for `parallel` points trained at once, in order (no GPU: every
    point an empty share, the CPU's): disjoint while there are GPUs enough; with
    `train.models_per_gpu` > 1, up to that many points share one GPU (round-robin), which is how a
    sweep of small models keeps one H100 busy. More points than that is an error."""
    if not visible:
        return [[] for _ in range(max(1, parallel))]
    if parallel <= 1:
        return [list(visible)]
    each = len(visible) // parallel
    if each >= per_expert:
        return [visible[k * each:(k + 1) * each] for k in range(parallel)]
    groups = [visible[i:i + per_expert] for i in range(0, len(visible) - per_expert + 1, per_expert)]
    if not groups or parallel > len(groups) * max(1, models_per_gpu):
        needed = -(-parallel // max(1, models_per_gpu)) * per_expert
        raise ValueError(f"sweep.parallel_points {parallel} with train.gpus_per_expert {per_expert} and "
                         f"train.models_per_gpu {models_per_gpu} needs {needed} "
                         f"GPUs, {len(visible)} visible ({visible}): lower parallel_points "
                         "or raise models_per_gpu")
    return [list(groups[k % len(groups)]) for k in range(parallel)]


def on_share(point: SweepPoint, share: list[str], visible: list[str], models_per_gpu: int | None = None) -> SweepPoint:
    """The point restricted to a share of the visible GPUs: its training (`train.gpus`; with
    `models_per_gpu`, the models it may put on each of them, its part of what the points sharing
    that GPU may) and its evaluation (`evaluate.device`, the share's first GPU as torch numbers the
    visible ones); all run-only, so a share changes no fingerprint."""
    if not share:
        return point
    packing = {} if models_per_gpu is None else {"models_per_gpu": max(1, models_per_gpu)}
    overrides = {**point.overrides,
                 "train": {**point.overrides.get("train", {}), "gpus": share, **packing},
                 "evaluate": {**point.overrides.get("evaluate", {}), "device": f"cuda:{visible.index(share[0])}"}}
    return dataclasses.replace(point, overrides=overrides)


def waves(pending: list[SweepPoint], parallel: int) -> list[list[SweepPoint]]:
    """The points in groups trained at once, in order."""
    step = max(1, parallel)
    return [pending[i:i + step] for i in range(0, len(pending), step)]


def run_scaling(sweep_plan: SweepPlan, layout: RunLayout, hooks: Hooks = Hooks()) -> tuple[dict, list[Report]]:
    """The scaling stage on the finished points; its manifest, and what to publish (when it worked)."""
    ctx = StageContext(sweep_plan, DataConfig(), layout, {}, hooks)
    manifest = run_one(SCALING, ctx)
    return manifest, ([] if manifest.get("skipped") else SCALING.reports(ctx, manifest))
