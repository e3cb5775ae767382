"""Stage 6, report: every row against the fair baseline, with its uncertainty, over trainer seeds.

Reads the evaluate stage of the run and of each other trainer seed's
replicate (`report.seeds` in all: runs/<name>/seeds/replicate_<k>/, made by
the run layer with train.seed + k), and states:

- every row's headline metric per task, mean and standard deviation over the seeds;
- every row's difference from the baseline with a 95% paired bootstrap interval over
  trainer seeds and test samples (reporting/stats.py), and a verdict that says
  "beat" or "lost" only when the interval excludes zero;
- why, measured: the share of in-batch pairs that come from the same fine
  cluster (expected under uniform shuffling, from the cluster stage's sizes)
  for the baseline and every expert, and each expert's accuracy on the task
  routed to it most against the baseline's;
- what each row cost: samples seen and training FLOPs (experts/flops.py), next
  to the paper's cost model, (seed_epochs + n expert_epochs) / (seed_epochs +
  expert_epochs) of one run, for its recipe where an expert's epoch is a whole
  data set's.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq

from pipelines.core.config import ReportConfig, section_hash
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    combine,
    hash_outputs,
    require_manifest,
)
from pipelines.core.stage import Fingerprint, Report, Stage, StageContext, StageResult
from reporting.phases import phase_lengths, phase_markdown
from reporting.stats import Interval, interval_text, mean_and_std, paired_bootstrap, paired_bootstrap_tasks
from routing.systems import ENSEMBLES, HEADLINE, ORACLE, ROUTED

REFERENCE = "baseline"
EXPERT = re.compile(r"expert_\d+")  # an expert's row or model name
ONE_MODEL = "baseline_1x"  # the paper's single model at 1x (train.expert_epoch: dataset)


def replicates(layout: RunLayout, seeds: int) -> list[RunLayout]:
    """The run itself, then the run folders of its other trainer seeds."""
    return [layout] + [layout.replicate(k) for k in range(1, seeds)]


def fingerprint(ctx: StageContext) -> Fingerprint:
    """The config and the evaluate stage of every replicate (FileNotFoundError: one has not run)."""
    evaluated = [require_manifest(r.evaluate, f"evaluate (trainer seed {k})")["fingerprint"]
                 for k, r in enumerate(replicates(ctx.layout, ctx.section.seeds))]
    config_hash = section_hash(ctx.section)
    return Fingerprint(combine("report", config_hash, evaluated), config_hash, {"evaluate": evaluated})


class Seeds:
    """The replicates' results and per-sample hits, in seed order."""

    def __init__(self, layouts: list[RunLayout]):
        self.results = [json.loads(r.results.read_text(encoding="utf-8")) for r in layouts]
        rows = [row for row in self.results[0]["rows"] if all(row in r["rows"] for r in self.results)]
        self.rows = [row for row in rows if row != ORACLE]
        per_seed = [per_sample_hits(r) for r in layouts]
        self.hits = {key: np.stack([hits[key] for hits in per_seed]).astype(np.float64)
                     for key in per_seed[0] if all(key in hits for hits in per_seed)}
        self.tasks = self.results[0]["tasks"]

    def metric(self, task: str, row: str, name: str) -> np.ndarray:
        """(seeds,) the metric of a row on a task, one value per seed."""
        return np.array([r["tasks"][task][row][name] for r in self.results])

    def diff(self, task: str, row: str, metric: str, reference: str = REFERENCE) -> np.ndarray:
        """(seeds, samples) the row's hits minus the reference's (the baseline's)."""
        return self.hits[(task, row, metric)] - self.hits[(task, reference, metric)]


def per_sample_hits(layout: RunLayout) -> dict[tuple[str, str, str], np.ndarray]:
    """(task, row, metric) -> (samples,) hits, in sample order, from one replicate's per_sample file."""
    table = pq.read_table(layout.per_sample).sort_by([("task", "ascending"), ("row", "ascending"),
                                                       ("metric", "ascending"), ("sample", "ascending")])
    keys = list(zip(*(table.column(c).to_pylist() for c in ("task", "row", "metric"))))
    hits = table.column("hit").to_numpy(zero_copy_only=False)
    out: dict[tuple[str, str, str], np.ndarray] = {}
    start = 0
    for end in range(1, len(keys) + 1):
        if end == len(keys) or keys[end] != keys[start]:
            out[keys[start]] = hits[start:end]
            start = end
    return out


def negative_shares(layout: RunLayout) -> dict:
    """Expected share of a batch's pairs from the same fine cluster (and from the same expert), under
    uniform shuffling: for the baseline over all data, for each expert over its own."""
    report = json.loads(layout.cluster_report.read_text(encoding="utf-8"))
    fine = np.array(report["fine_sizes"], dtype=np.float64)
    owned = [np.array(f, dtype=np.int64) for f in report["expert_fine_clusters"]]
    experts = np.array([fine[f].sum() for f in owned])

    def share(sizes: np.ndarray) -> float:
        total = sizes.sum()
        return float((sizes * (sizes - 1)).sum() / (total * (total - 1))) if total > 1 else 0.0

    return {"baseline": {"same_fine_cluster": share(fine), "same_expert": share(experts)},
            **{f"expert_{e:03d}": {"same_fine_cluster": share(fine[f]), "same_expert": 1.0}
               for e, f in enumerate(owned)}}


def costs(layout: RunLayout, rows: list[str], ablations: dict[str, str]) -> dict:
    """Samples seen and FLOPs of every row that trains (the train manifests' counts)."""
    manifest = require_manifest(layout.train, "train")["counts"]
    seen, flops = manifest.get("samples_seen"), manifest.get("flops_per_sample")
    if not seen or not flops:
        return {}

    def cost(models: list[str], counts: dict) -> dict:  # a seed given (train.seed_checkpoint) cost nothing here
        masked = sum(counts[m]["masked"] for m in models if m in counts)
        unmasked = sum(counts[m]["unmasked"] for m in models if m in counts)
        return {"samples": masked + unmasked, "flops": masked * flops["masked"] + unmasked * flops["unmasked"]}

    experts = sorted(m for m in seen if m.startswith("expert_"))
    out = {"seed": cost(["seed"], seen)}
    for single in (REFERENCE, ONE_MODEL):
        if single in seen:
            out[single] = cost(["seed", single], seen)
    for e in experts:
        out[e] = cost(["seed", e], seen)
    system = cost(["seed", *experts], seen)
    for row in rows:
        if row in ENSEMBLES:
            out[row] = system
    registry = json.loads(layout.registry.read_text(encoding="utf-8"))
    for row, variant in ablations.items():  # the run's seed, then the ablation's experts
        v = require_manifest(layout.ablation(variant).train, "train")["counts"].get("samples_seen", {})
        if not v:
            continue
        seed = out["seed"]
        if variant.startswith("expert_epochs="):  # the seed's first epochs only, then this phase's models
            start = registry["epochs_total"] - int(variant.partition("=")[2])
            seed = {k: x * start / registry["seed"]["epochs"] for k, x in seed.items()}
        alone = row.rpartition(" ")[2]  # a variant's expert row: that expert alone
        models = ["baseline"] if row.endswith(REFERENCE) else [alone] if EXPERT.fullmatch(alone) \
            else sorted(m for m in v if EXPERT.fullmatch(m))
        own = cost(models, v)
        out[row] = {k: type(own[k])(seed[k] + own[k]) for k in own}
    return out


def work(ctx: StageContext, fp: Fingerprint) -> StageResult:
    cfg: ReportConfig = ctx.section
    layout = ctx.layout
    seeds = Seeds(replicates(layout, cfg.seeds))
    first = seeds.results[0]
    tasks = list(seeds.tasks)
    classification = [t for t in tasks if seeds.tasks[t]["kind"] == "classification"]
    boot = dict(resamples=cfg.resamples, confidence=cfg.confidence, seed=cfg.bootstrap_seed)
    has_reference, one_model = REFERENCE in seeds.rows, ONE_MODEL in seeds.rows
    references = first.get("references", {})
    table: dict = {}
    for row in seeds.rows:
        entry = table.setdefault(row, {})
        for task in tasks:
            metric = HEADLINE[seeds.tasks[task]["kind"]]
            entry[task] = dict(zip(("mean", "std"), mean_and_std(seeds.metric(task, row, metric))))
            if has_reference and row != REFERENCE:
                entry[task]["vs_baseline"] = vars(paired_bootstrap(seeds.diff(task, row, metric), **boot))
            if one_model and row in ENSEMBLES:  # the paper's comparison: MoDE at its cost against 1x
                entry[task]["vs_baseline_1x"] = vars(paired_bootstrap(seeds.diff(task, row, metric, ONE_MODEL), **boot))
        if classification:
            per_seed = np.mean([seeds.metric(t, row, "top1") for t in classification], axis=0)
            entry["mean"] = dict(zip(("mean", "std"), mean_and_std(per_seed)))
            if has_reference and row != REFERENCE:
                entry["mean"]["vs_baseline"] = vars(paired_bootstrap_tasks(
                    [seeds.diff(t, row, "top1") for t in classification], **boot))
            if one_model and row in ENSEMBLES:
                entry["mean"]["vs_baseline_1x"] = vars(paired_bootstrap_tasks(
                    [seeds.diff(t, row, "top1", ONE_MODEL) for t in classification], **boot))
        own = references.get(row)
        if own in seeds.rows:  # an expert-phase variant's rows against the baseline of the same seed epoch
            for task in tasks:
                metric = HEADLINE[seeds.tasks[task]["kind"]]
                entry[task]["vs_reference"] = vars(paired_bootstrap(seeds.diff(task, row, metric, own), **boot))
            if classification:
                entry["mean"]["vs_reference"] = vars(paired_bootstrap_tasks(
                    [seeds.diff(t, row, "top1", own) for t in classification], **boot))
    specialists = []
    weights = {t: first["tasks"][t]["routing_weights"] for t in classification}
    shares = negative_shares(layout)
    experts = [row for row in seeds.rows if EXPERT.fullmatch(row)]  # the run's own (not a variant's)
    for e, expert in enumerate(experts):
        own = max(classification, key=lambda t: weights[t][e]) if classification and e < len(weights[tasks[0]]) \
            else None
        spec = {"model": expert, **shares.get(expert, {}), "own_task": own}
        if own and has_reference:
            spec["own_task_top1"] = table[expert][own]["mean"]
            spec["baseline_top1"] = table[REFERENCE][own]["mean"]
            spec["vs_baseline"] = table[expert][own]["vs_baseline"]
        specialists.append(spec)
    ablations = {row: v for row, v in first.get("ablation_rows", {}).items() if row in seeds.rows}
    validation = validation_table([r.get("validation", {}) for r in seeds.results])
    report = {"seeds": cfg.seeds, "confidence": cfg.confidence, "resamples": cfg.resamples,
              "routing": first["routing"],
              "lambda": [r["lambda"]["MoDE"] for r in seeds.results], "rows": seeds.rows, "tasks": tasks,
              "classification_tasks": classification, "table": table, "specialists": specialists,
              "negatives": shares.get("baseline", {}), "cost": costs(layout, seeds.rows, ablations),
              "paper_cost_model": paper_cost(layout), "validation": validation}
    phases = phase_lengths(layout, ablations, references)
    if phases:
        report["phases"] = phases
    atomic_write_json(layout.report_json, report)
    atomic_write_text(layout.report_markdown, report_markdown(report))
    outputs = [layout.report_json, layout.report_markdown, plot_differences(report, layout)]
    return StageResult(outputs=hash_outputs(layout.report, [p for p in outputs if p]),
                       counts={"seeds": cfg.seeds, "rows": len(seeds.rows), "tasks": len(tasks)})


def validation_table(per_seed: list[dict]) -> dict:
    """Seed and baseline on the validation tasks, mean and std over trainer seeds: the numbers a recipe
    setting is chosen on (the test tasks never are)."""
    out: dict = {}
    for task in per_seed[0] if per_seed and all(per_seed) else []:
        kind = per_seed[0][task]["kind"]
        metric = HEADLINE[kind]
        for row in [r for r in per_seed[0][task] if r != "kind"]:
            values = np.array([s[task][row][metric] for s in per_seed])
            out.setdefault(row, {})[task] = dict(zip(("mean", "std"), mean_and_std(values)), metric=metric)
    return out


def paper_cost(layout: RunLayout) -> dict | None:
    """MoDE-n's cost relative to one model in the paper's recipe, for this run's epochs."""
    registry = json.loads(layout.registry.read_text(encoding="utf-8"))
    seed_epochs = registry["seed"]["epochs"]
    expert_epochs = registry["epochs_total"] - seed_epochs
    n = len(registry["experts"])
    if not seed_epochs or expert_epochs <= 0:
        return None
    return {"experts": n, "seed_epochs": seed_epochs, "expert_epochs": expert_epochs,
            "relative_to_one_model": (seed_epochs + n * expert_epochs) / (seed_epochs + expert_epochs)}


def report_markdown(report: dict) -> str:
    tasks, cls = report["tasks"], report["classification_tasks"]
    seeds = report["seeds"]
    lams = sorted({entry["value"] for entry in report["lambda"]})
    out = ["# MoDE against the fair single model", "",
           f"{seeds} trainer seed(s); intervals are {report['confidence']:.0%} paired bootstrap intervals over "
           + ("trainer seeds and test samples" if seeds > 1 else
              "test samples only (one trainer seed: training noise is not covered)")
           + f". Routing: {report['routing']} formula, lambda {', '.join(f'{v:g}' for v in lams)} "
           f"({report['lambda'][0]['source']}).", ""]
    headline = [f"{t} ({'top1' if t in cls else 'i2t R@1'})" for t in tasks] + (["mean top1"] if cls else [])
    columns = tasks + (["mean"] if cls else [])
    out += ["Headline metric (%), mean ± std over seeds:", "", "| model | " + " | ".join(headline) + " |",
            "|---|" + "---:|" * len(columns)]
    for row in report["rows"]:
        cells = [report["table"][row][c] for c in columns]
        out.append(f"| {row} | " + " | ".join(f"{c['mean'] * 100:.1f} ± {c['std'] * 100:.1f}" for c in cells) + " |")
    out += ["", "Difference from the baseline (points) and its interval:", "",
            "| model | " + " | ".join(headline) + " |", "|---|" + "---:|" * len(columns)]
    for row in report["rows"]:
        cells = [report["table"][row][c].get("vs_baseline") for c in columns]
        if all(c is None for c in cells):
            continue
        out.append(f"| {row} | " + " | ".join(interval_text(Interval(**c)) if c else "" for c in cells) + " |")
    out += ["", "Verdict (routed ensemble against the baseline):", ""]
    for column in columns:
        c = report["table"].get(ROUTED, {}).get(column, {}).get("vs_baseline")
        if c:
            interval = Interval(**c)
            out.append(f"- {column}: {interval.verdict}: {interval_text(interval)} points")
    paper_rows = [(column, report["table"].get(ROUTED, {}).get(column, {}).get("vs_baseline_1x")) for column in columns]
    if any(c for _, c in paper_rows):
        out += ["", "The paper's comparison (experts in the paper's accounting, each epoch a whole data set's; the "
                "routed ensemble against the single model at 1x, `baseline_1x`; the rows above compare it with "
                "the compute-matched baseline):", ""]
        out += [f"- {column}: {Interval(**c).verdict}: {interval_text(Interval(**c))} points"
                for column, c in paper_rows if c]
    out += phase_markdown(report, columns, headline)
    out += ["", "Why, measured: the share of a batch's pairs from the same fine cluster (expected under uniform "
            "shuffling), and each expert on the task routed to it most:", "",
            "| model | same fine cluster | same expert | own task | its top1 | baseline's top1 | difference |",
            "|---|---:|---:|---|---:|---:|---:|"]
    base = report["negatives"]
    if base:
        out.append(f"| baseline | {base['same_fine_cluster']:.4f} | {base['same_expert']:.3f} | | | | |")
    for spec in report["specialists"]:
        diff = interval_text(Interval(**spec["vs_baseline"])) if spec.get("vs_baseline") else ""
        mine = f"{spec['own_task_top1'] * 100:.1f}" if "own_task_top1" in spec else ""
        theirs = f"{spec['baseline_top1'] * 100:.1f}" if "baseline_top1" in spec else ""
        out.append(f"| {spec['model']} | {spec.get('same_fine_cluster', 0):.4f} | {spec.get('same_expert', 0):.3f} "
                   f"| {spec.get('own_task') or ''} | {mine} | {theirs} | {diff} |")
    if report["cost"]:
        reference = report["cost"].get("baseline", {}).get("flops")
        out += ["", "What each row cost (training, all its models; an ensemble counts every expert):", "",
                "| model | samples seen | training FLOPs | relative to the baseline |", "|---|---:|---:|---:|"]
        for row, c in report["cost"].items():
            ratio = f"{c['flops'] / reference:.2f}x" if reference else ""
            out.append(f"| {row} | {c['samples']:,} | {c['flops']:.3g} | {ratio} |")
    validation = report.get("validation") or {}
    if validation:
        val_tasks = sorted({t for row in validation.values() for t in row})
        out += ["", "On the validation split of the training domains (what recipe settings are chosen on), "
                "mean ± std over seeds:", "",
                "| model | " + " | ".join(f"{t} ({next(iter(validation.values()))[t]['metric']})" for t in val_tasks)
                + " |", "|---|" + "---:|" * len(val_tasks)]
        for row, cells in validation.items():
            out.append(f"| {row} | " + " | ".join(f"{cells[t]['mean'] * 100:.1f} ± {cells[t]['std'] * 100:.1f}"
                                                  for t in val_tasks) + " |")
    paper = report.get("paper_cost_model")
    if paper:
        ratio = paper["relative_to_one_model"]
        out += ["", f"The paper's recipe (each expert's epoch a whole data set's) would cost MoDE-{paper['experts']} "
                f"(seed_epochs + n expert_epochs) / (seed_epochs + expert_epochs) = {ratio:.2f}x one model here; "
                + ("the experts here were trained so (train.expert_epoch: dataset), so the baseline is compute-matched "
                   "and baseline_1x is one model's cost." if ONE_MODEL in report["cost"] else
                   "moda's experts each see their own cluster, so the ensemble costs what the baseline costs.")]
    return "\n".join(out) + "\n"


def plot_differences(report: dict, layout: RunLayout):
    """differences.png: every compared row's difference from the baseline, with its interval, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = report["tasks"] + (["mean"] if report["classification_tasks"] else [])
    rows = [r for r in report["rows"] if any(report["table"][r][c].get("vs_baseline") for c in columns)
            and not (r == "seed" or EXPERT.fullmatch(r.rpartition(" ")[2]))]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(columns), 3.8))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        cells = [report["table"][row][c]["vs_baseline"] for c in columns]
        means = np.array([c["mean"] for c in cells]) * 100
        errors = np.array([[c["mean"] - c["low"], c["high"] - c["mean"]] for c in cells]).T * 100
        ax.bar(np.arange(len(columns)) + i * width, means, width, yerr=errors, capsize=2, label=row)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns)
    ax.set_ylabel("points against the baseline")
    ax.set_title(f"Difference from the fair baseline ({report['confidence']:.0%} intervals, {report['seeds']} seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(layout.report_plot) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return layout.report_plot


def reports(ctx: StageContext, manifest: dict) -> list[Report]:
    return [Report("report", "MoDE against the fair baseline, with intervals",
                   markdown=ctx.layout.report_markdown.read_text(encoding="utf-8"))]


STAGE = Stage(name="report", section="report", reads=("evaluate",), fingerprint=fingerprint, work=work,
              reports=reports, summary=lambda layout: layout.report_markdown)
