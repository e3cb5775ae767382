"""The scaling stage of `moda sweep`: every point's cost and errors, the laws fitted to them, and
the answer a user asks ("at my budget, one CLIP or n data experts, and how many?").

Reads each point's report (its rows' samples seen and FLOPs, counted from
the real model by experts/flops.py), its per-sample hits on the test tasks
(the mean over its trainer seeds) and its train manifests (wall time, GPU
slots), and, per system (the single model, every MoDE-n) and task (and the
mean error over the classification tasks):

- the saturating power law err(C) = A C^-alpha + E_inf through the system's
  compute-Pareto frontier over every point (reporting/scaling.py);
- intervals from `resamples` redraws of the test samples, the same redraw
  for every point and system, so two systems' laws stay paired on the same
  images and their crossing and compute multiplier get intervals too;
- the held-out check: the law fitted without the largest budget, its
  prediction there against what was measured.

Nothing here trains or evaluates: the stage is pure arithmetic on the points'
files, fingerprinted by their report manifests, so rerunning a finished sweep
redoes nothing and a changed point refits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from experts.flops import parameter_count
from experts.models import read_model_config
from pipelines.core.config import SweepConfig, section_hash
from pipelines.core.devices import is_cuda
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import atomic_write_json, atomic_write_text, combine, hash_outputs, require_manifest
from pipelines.core.stage import Fingerprint, Report, Stage, StageContext, StageResult
from reporting.report import per_sample_hits, replicates
from reporting.scaling import (
    PowerLaw,
    compute_multiplier,
    crossing,
    fit_frontier,
    holdout_check,
    interval,
    pareto_frontier,
    refit,
)
from reporting.scaling_tables import inline_plots, plot_task, scaling_markdown
from routing.systems import HEADLINE

MEAN = "mean"  # the mean error over the classification tasks, fitted as one more task
SINGLE = "single model"


@dataclass(frozen=True)
class SweepPoint:
    """One model at one budget: its run folder's name and the config overrides that make it."""

    name: str
    model: str
    epochs: int
    seed_epochs: int
    overrides: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class SweepPlan:
    """What the scaling stage reads: the sweep section, its points, system label -> evaluation row,
    the ablations every point trains (MoDE-n's other n) and the trainer seeds every point ran."""

    sweep: SweepConfig
    points: tuple[SweepPoint, ...]
    systems: dict[str, str]
    variants: tuple[str, ...] = ()
    seeds: int = 1


def point_layouts(ctx: StageContext) -> list[RunLayout]:
    return [ctx.layout.sweep_point(p.name) for p in ctx.section.points]


def fingerprint(ctx: StageContext) -> Fingerprint:
    """The sweep section and every point's report (FileNotFoundError: a point has not finished)."""
    plan: SweepPlan = ctx.section
    reported = [require_manifest(p.report, f"report of sweep point {p.root.name}")["fingerprint"]
                for p in point_layouts(ctx)]
    config_hash = section_hash(plan.sweep)
    shape = [[p.name, p.model, p.epochs, p.seed_epochs] for p in plan.points]
    return Fingerprint(combine("scaling", config_hash, shape, plan.systems, plan.variants, plan.seeds, reported),
                       config_hash,
                       {"reports": reported})


def gpu_hours(layouts: list[RunLayout]) -> float | None:
    """GPU-hours of a point's training (seed, baseline, experts, ablations' experts): each model's
    seconds times the GPUs it held; None on a CPU."""
    total, on_gpu = 0.0, False
    for layout in layouts:
        manifest = require_manifest(layout.train, "train")
        slots = manifest.get("gpu_slots") or []
        if not is_cuda(manifest.get("device", "")) or not slots:
            continue
        on_gpu = True
        every, per_expert = sum(len(s) for s in slots), len(slots[0])
        for model, seconds in manifest["counts"]["seconds_per_model"].items():
            total += seconds * (per_expert if model.startswith("expert_") else every) / 3600
    return total if on_gpu else None


def point_record(point: SweepPoint, layout: RunLayout, plan: SweepPlan) -> dict:
    """A point's cost: model size, FLOPs per sample, samples and FLOPs of every system (one training
    of each), and the wall time and GPU-hours of all its training and evaluation (every trainer seed)."""
    report = json.loads(layout.report_json.read_text(encoding="utf-8"))
    cost, systems = report["cost"], plan.systems
    train = require_manifest(layout.train, "train")
    seeds = replicates(layout, plan.seeds)
    trained = [run for r in seeds for run in [r] + [r.ablation(v) for v in plan.variants]]
    seed = cost["seed"]["flops"]
    total = cost["baseline"]["flops"] + sum(cost[row]["flops"] - seed for label, row in systems.items()
                                            if label != SINGLE)
    wall = sum(require_manifest(t.train, "train")["seconds"] for t in trained) \
        + sum(require_manifest(r.evaluate, "evaluate")["seconds"] for r in seeds)
    return {"name": point.name, "model": point.model, "epochs": point.epochs, "seed_epochs": point.seed_epochs,
            "params": parameter_count(read_model_config(layout.model_config)),
            "gflops_per_sample": {k: v / 1e9 for k, v in train["counts"]["flops_per_sample"].items()},
            "samples": {label: cost[row]["samples"] for label, row in systems.items()},
            "flops": {label: cost[row]["flops"] for label, row in systems.items()},
            "total_flops": total, "wall_seconds": wall, "gpu_hours": gpu_hours(trained)}


def load_hits(layouts: list[RunLayout], systems: dict[str, str], seeds: int) -> tuple[dict, dict]:
    """task -> kind, and (system, task) -> (points, samples) hits of the task's headline metric,
    each point's the mean over its trainer seeds."""
    results = json.loads(layouts[0].results.read_text(encoding="utf-8"))
    kinds = {task: info["kind"] for task, info in results["tasks"].items()}
    hits: dict[tuple[str, str], list[np.ndarray]] = {}
    for layout in layouts:
        per_seed = [per_sample_hits(r) for r in replicates(layout, seeds)]
        for label, row in systems.items():
            for task, kind in kinds.items():
                key = (task, row, HEADLINE[kind])
                hits.setdefault((label, task), []).append(np.mean([h[key] for h in per_seed], axis=0))
    return kinds, {key: np.stack(rows).astype(np.float64) for key, rows in hits.items()}


def error_draws(kinds: dict, hits: dict, systems: dict, resamples: int, seed: int) -> tuple[dict, dict]:
    """(system, task) -> (points,) error and -> (resamples, points) redrawn errors; the redraw of a
    task's test samples is the same for every point and system. The mean task averages the
    classification tasks' errors, redraw by redraw."""
    rng = np.random.default_rng(seed)
    err, draws = {}, {}
    for task in kinds:
        n = next(h for (label, t), h in hits.items() if t == task).shape[1]
        weights = np.stack([np.bincount(rng.integers(n, size=n), minlength=n) for _ in range(resamples)]) / n
        for label in systems:
            h = hits[(label, task)]
            err[(label, task)] = 1.0 - h.mean(axis=1)
            draws[(label, task)] = 1.0 - weights @ h.T
    classification = [t for t, kind in kinds.items() if kind == "classification"]
    if classification:
        for label in systems:
            err[(label, MEAN)] = np.mean([err[(label, t)] for t in classification], axis=0)
            draws[(label, MEAN)] = np.mean([draws[(label, t)] for t in classification], axis=0)
    return err, draws


def law_dict(law: PowerLaw | None) -> dict | None:
    return None if law is None else {"a": law.a, "alpha": law.alpha, "e_inf": law.e_inf, "c0": law.c0}


def fit_system(compute: np.ndarray, err: np.ndarray, draws: np.ndarray, confidence: float) -> dict:
    """One system's law on one task: point estimate, intervals, held-out check."""
    frontier = len(np.unique(compute[pareto_frontier(compute, err)]))
    if frontier < 3:
        return {"law": None, "why": f"{frontier} point(s) on the compute-Pareto frontier; a law with a floor "
                                    "needs 3 or more"}
    try:
        law = fit_frontier(compute, err)
    except (RuntimeError, ValueError) as why:
        return {"law": None, "why": str(why)}
    fits = refit(compute, draws)
    good = [f for f in fits if f is not None]
    top, beyond = float(compute.max()), 10 * float(compute.max())
    try:
        held_out = holdout_check(compute, err)
    except (RuntimeError, ValueError):
        held_out = {"predicted": None, "observed": None, "error": None}
    return {"law": law_dict(law), "fits": fits, "redraws_fitted": len(good), "redraws": len(fits),
            "alpha_interval": interval([f.alpha for f in good], confidence),
            "e_inf_interval": interval([f.e_inf for f in good], confidence),
            "predictions": [{"compute": c, "error": float(law(c)),
                             "interval": interval([float(f(c)) for f in good], confidence)} for c in (top, beyond)],
            "holdout": held_out}


def reported_difference(report: dict, row: str, task: str, compute: float) -> dict:
    """The same difference as a point's own report states it: the paired bootstrap over its trainer
    seeds and test samples (the report's accuracy differences, turned into error differences)."""
    vs = report["table"][row][task]["vs_baseline"]
    return {"compute": compute, "value": -vs["mean"], "interval": (-vs["high"], -vs["low"]), "seeds": vs["seeds"]}


def compare(single: dict, other: dict, compute: np.ndarray, measured: dict, confidence: float) -> dict:
    """`other` against the single model: the measured error difference at the largest compute (what a
    verdict rests on), and from the two laws the compute where they cross in the swept range and
    `other`'s compute multiplier at each compute of its frontier (`compute`), with intervals over the
    same redraws (a law's extrapolation near its floor is too fragile to carry a verdict)."""
    if single["law"] is None or other["law"] is None:
        return {"difference_at_largest": measured, "crossing": None, "multipliers": []}
    law_s, law_o = (PowerLaw(**single["law"]), PowerLaw(**other["law"]))
    low, high = float(compute.min()), float(compute.max())
    pairs = [(s, o) for s, o in zip(single["fits"], other["fits"]) if s is not None and o is not None]
    crossings = [crossing(s, o, low, high) for s, o in pairs]
    found = [c for c in crossings if c is not None]
    multipliers = []
    for c in np.unique(compute):
        values = [float(compute_multiplier(s, o, c)) for s, o in pairs]
        multipliers.append({"compute": float(c), "value": float(compute_multiplier(law_s, law_o, c)),
                            "interval": interval(values, confidence)})
    return {"difference_at_largest": measured, "crossing": crossing(law_s, law_o, low, high), "range": [low, high],
            "redraws_crossing": len(found), "redraws": len(pairs),
            "crossing_interval": interval(found, confidence) if found else (None, None),
            "multipliers": multipliers}


def work(ctx: StageContext, fp: Fingerprint) -> StageResult:
    plan: SweepPlan = ctx.section
    layouts = point_layouts(ctx)
    records = [point_record(p, layout, plan) for p, layout in zip(plan.points, layouts)]
    kinds, hits = load_hits(layouts, plan.systems, plan.seeds)
    reports_of = [json.loads(layout.report_json.read_text(encoding="utf-8")) for layout in layouts]
    err, draws = error_draws(kinds, hits, plan.systems, plan.sweep.resamples, seed=0)
    tasks = list(kinds) + ([MEAN] if any(k == "classification" for k in kinds.values()) else [])
    fits: dict = {}
    comparisons: dict = {}
    for task in tasks:
        for label in plan.systems:
            compute = np.array([r["flops"][label] for r in records])
            fits.setdefault(label, {})[task] = fit_system(compute, err[(label, task)], draws[(label, task)],
                                                          plan.sweep.confidence)
        for label, row in plan.systems.items():
            if label != SINGLE:
                compute = np.array([r["flops"][label] for r in records])
                top = int(np.argmax(compute))
                measured = reported_difference(reports_of[top], row, task, float(compute[top]))
                frontier = compute[pareto_frontier(compute, err[(label, task)])]
                comparisons.setdefault(label, {})[task] = compare(fits[SINGLE][task], fits[label][task], frontier,
                                                                  measured, plan.sweep.confidence)
    for label in fits:
        for task in fits[label]:
            fits[label][task].pop("fits", None)
    for point, r in enumerate(records):
        r["error"] = {label: {task: float(err[(label, task)][point]) for task in tasks} for label in plan.systems}
    summary = {"systems": plan.systems, "labels": list(plan.systems), "tasks": tasks, "kinds": kinds,
               "points": records, "fits": fits, "comparisons": comparisons, "confidence": plan.sweep.confidence,
               "resamples": plan.sweep.resamples, "seeds": plan.seeds,
               "test_samples": {task: int(next(h for (lb, t), h in hits.items() if t == task).shape[1])
                                for task in kinds}}
    atomic_write_json(ctx.layout.scaling_json, summary)
    plots = [plot_task(summary, task, ctx.layout.scaling_plot(task)) for task in tasks]
    atomic_write_text(ctx.layout.scaling_markdown, scaling_markdown(summary))
    outputs = [ctx.layout.scaling_json, ctx.layout.scaling_markdown, *plots]
    return StageResult(outputs=hash_outputs(ctx.layout.scaling, outputs),
                       counts={"points": len(records), "systems": len(plan.systems), "tasks": len(tasks),
                               "laws": sum(f["law"] is not None for s in fits.values() for f in s.values())})


def reports(ctx: StageContext, manifest: dict) -> list[Report]:
    """The summary, with the plots inlined (a Prefect artifact cannot point at a local file)."""
    text = ctx.layout.scaling_markdown.read_text(encoding="utf-8")
    return [Report("scaling", "Scaling laws: error against training compute, per system",
                   markdown=inline_plots(text, ctx.layout.scaling))]


STAGE = Stage(name="scaling", section="sweep", reads=(), fingerprint=fingerprint, work=work, reports=reports)
