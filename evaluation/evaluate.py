"""Stage 5, evaluate: the routed ensemble against single models, on held-out tasks.

Rows of the report, for every task:
  seed                the shared starting point of all experts
  baseline            the fair single model: the seed continued on all data for
                      the same number of samples as all experts together
  expert_000, ...     each expert alone
  uniform ensemble    experts' logits averaged
  routed ensemble     experts' logits weighted by MoDE routing (the paper's formula,
                      lambda chosen on the validation tasks)
  routed, released formula, routed by coarse centres
                      the same experts routed by the reference script's formula, and
                      by the paper's formula over the experts' coarse centres
  oracle best expert  the best single expert picked with the test labels: an upper
                      bound for routing to one expert, not a fair competitor
  Rand-n uniform ensemble, one-step routed ensemble, MoDE-k routed/uniform ensemble,
  MoDE-n m=M routed ensemble
                      the paper's ablations, when `evaluate.ablations` asks for them;
                      all continue the same seed
  expert_epochs=E routed/uniform ensemble, expert_epochs=E baseline
                      another expert phase's length: experts and a matched baseline
                      trained E epochs from an earlier epoch of the same seed (the
                      report compares these rows with that baseline)

The single models (seed, baseline) are also scored on the validation tasks
(results.json's "validation"): a recipe setting (patch dropout, epochs, the
generator) is chosen on those numbers, never on the test tasks.

Besides results.json (every row's metrics) it writes per_sample.parquet:
each row's hit or miss on every test sample, which the report stage
resamples for paired intervals.

Classification tasks: class names (with prompt templates) are embedded with
the clustering's caption encoder and routed; metrics top-1, top-5 (with at
least 5 classes) and mean per-class recall, as clip_benchmark defines them.
Retrieval tasks (images with one or several captions): image-to-text uses
one weight vector routed from the whole caption set, text-to-image routes
every query caption on its own (the paper's definitions); metrics R@1, R@5,
R@10 both ways, an image-to-text hit being any of the image's captions.

Task folders: evaluation/tasks.py; models scored on them: evaluation/scorer.py. This evaluation's
tables and plots: evaluation/tables.py; the comparison over trainer seeds with intervals: the report
stage, reporting/report.py.
Every number is computed from the run's own files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from clustering.encoder import encode, load_run_encoder
from evaluation.clip_benchmark_format import write_field_formats
from evaluation.clip_features import load_clip
from evaluation.image_stream import decode_threads
from evaluation.linear_probe import probe
from evaluation.scorer import Scorer, num_images, warm_features
from evaluation.systems import System, ablation_rows, ablation_system, main_system, phase_baseline
from evaluation.tables import markdown_report, plot_report
from evaluation.tasks import Task, load_tasks, task_folders, task_roots
from experts.registry import added_fingerprint, current_added, read_registry
from pipelines.core.config import EvaluateConfig, section_hash
from pipelines.core.devices import is_cuda, pick_device
from pipelines.core.jobs import Call, run_jobs
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    combine,
    file_sha256,
    hash_outputs,
    require_manifest,
)
from pipelines.core.stage import SCORES, Fingerprint, Report, Stage, StageContext, StageResult
from pipelines.shardio.remote import is_url, mirror
from routing.metadata import classname_embeddings
from routing.systems import (
    COARSE,
    HEADLINE,
    ORACLE,
    RELEASED,
    ROUTED,
    UNIFORM,
    Router,
    TaskView,
    choose_lambda,
    ensemble,
    single,
)
from routing.weights import nearest_fine

PER_SAMPLE_SCHEMA = pa.schema([("task", pa.string()), ("row", pa.string()), ("metric", pa.string()),
                               ("sample", pa.int32()), ("hit", pa.bool_())])


def task_metadata(task: Task, encoder) -> tuple[np.ndarray, list[str]]:
    """A task's routing metadata embedded with the caption encoder, and the texts behind it."""
    if task.kind == "classification":
        return classname_embeddings(encoder, task.classnames, task.templates), task.classnames
    return encode(encoder, task.captions), task.captions


def view(task: Task) -> TaskView:
    return TaskView(task.name, task.kind, task.labels, task.caption_image)


class Rows:
    """Every row's metrics per task and its per-sample hits (for the report's intervals)."""

    def __init__(self):
        self.metrics: dict[str, dict[str, dict]] = {}
        self.hits: list[dict] = []

    def add(self, task: Task, row: str, result: tuple[dict, dict], **extra) -> None:
        metrics, hits = result
        self.metrics.setdefault(task.name, {})[row] = {**metrics, **extra}
        for metric, flags in hits.items():
            self.hits.extend({"task": task.name, "row": row, "metric": metric, "sample": i, "hit": bool(h)}
                             for i, h in enumerate(flags.tolist()))

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.hits, schema=PER_SAMPLE_SCHEMA)


def routed_rows(rows: Rows, name: str, system: System, tasks: list[Task], metas: list[np.ndarray],
                stacked: list[np.ndarray], lam: float, rules: dict[str, str]) -> dict[str, list[dict]]:
    """Add the system's routed rows (`rules`: row name -> routing rule); return each rule's routing."""
    routings = {}
    for row, rule in rules.items():
        routings[rule] = [system.router.weights(t.kind, m, rule, lam) for t, m in zip(tasks, metas)]
        for t, task in enumerate(tasks):
            rows.add(task, row, ensemble(view(task), stacked[t], routings[rule][t]))
    return routings


def linear_probes(tasks: list[Task], models: dict[str, Path], experts: list[str], scorer: Scorer,
                  shots: tuple[int, ...]) -> dict:
    """Per classification task with a train split: each model's probe (evaluation/linear_probe.py), and
    one on the experts' features concatenated ("MoDE vision ensemble", the paper's section 5.4)."""
    probed = [t for t in tasks if t.kind == "classification" and t.train_images is not None]
    out: dict = {}
    for name, path in tqdm(list(models.items()), desc="linear probe", unit="model") if probed else []:
        clip = load_clip(path, scorer.device)
        for task in probed:
            out.setdefault(task.name, {"_features": {}})["_features"][name] = (
                scorer.image_features(clip, path, task, "train"), scorer.image_features(clip, path, task))
    for task in probed:
        feats = out[task.name].pop("_features")
        for name, (train_x, test_x) in feats.items():
            out[task.name][name] = probe(train_x, task.train_labels, test_x, task.labels, shots)
        if experts:
            out[task.name]["MoDE vision ensemble"] = probe(
                np.concatenate([feats[e][0] for e in experts], axis=1), task.train_labels,
                np.concatenate([feats[e][1] for e in experts], axis=1), task.labels, shots)
    return out


def lambda_on_validation(system: System, val_tasks: list[Task], val_metas: list[np.ndarray], scorer: Scorer,
                         default: float) -> dict:
    """The paper-formula lambda that routes `system` best on the validation tasks, or the config's."""
    if not val_tasks:
        return {"value": default, "source": "config (no validation tasks)"}
    stacked = system.scores(val_tasks, scorer)
    lam, scores = choose_lambda([view(t) for t in val_tasks], stacked, val_metas, system.router)
    return {"value": lam, "source": "validation", "validation_scores": {str(k): v for k, v in scores.items()}}


def fingerprint(ctx: StageContext) -> Fingerprint:
    """Config, the embed, cluster and train stages, the task files (test and validation), ablations and
    added experts."""
    layout = ctx.layout
    hashes = task_hashes([local_roots(d, layout) for d in (ctx.data.eval_tasks, ctx.data.val_tasks) if d])
    task_hash = combine(sorted(hashes.values()))
    ablation_fps = [(v, require_manifest(layout.ablation(v).train, f"train ({v} ablation)")["fingerprint"])
                    for v in ctx.section.ablations]
    config_hash = section_hash(ctx.section)
    up = {name: ctx.upstream[name]["fingerprint"] for name in ("embed", "train", "cluster")}
    value = combine("evaluate", config_hash, up["embed"], up["train"], up["cluster"], task_hash, ablation_fps,
                    added_fingerprint(layout))
    return Fingerprint(value, config_hash, {"train": up["train"], "cluster": up["cluster"], "tasks": task_hash},
                       {"task_hashes": hashes})


def folder_hash(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    return combine([(p.relative_to(folder).as_posix(), file_sha256(p)) for p in files])


def local_roots(spec: str, layout: RunLayout) -> str:
    """`spec` with every URL root (s3://, https://, ...) replaced by its local mirror (fetched when the
    remote changed; pipelines/shardio/remote.py)."""
    return "::".join(str(mirror(str(root), layout.remote_cache)) if is_url(root) else str(root)
                     for root in str(spec).split("::") if root)


def task_hashes(specs: list[str]) -> dict[str, str]:
    """Each task folder's content hash (resolved path -> hash), for the stage's fingerprint and the
    image-feature cache. A root that does not exist holds no tasks (validation tasks are optional)."""
    return {str(f.resolve()): folder_hash(f) for spec in specs for root in task_roots(spec) if root.is_dir()
            for f in task_folders(root)}


def work(ctx: StageContext, fp: Fingerprint) -> StageResult:
    cfg: EvaluateConfig = ctx.section
    layout = ctx.layout
    device = pick_device(cfg.device)
    skip = cfg.unreadable_images == "skip"
    tasks = load_tasks(local_roots(ctx.data.eval_tasks, layout), check_images=not skip)
    val_tasks = load_tasks(local_roots(ctx.data.val_tasks, layout), check_images=not skip) \
        if ctx.data.val_tasks else []
    scorer = Scorer(device, cfg.batch_size, decode_threads(cfg.workers, device), layout.feature_cache,
                    fp.details["task_hashes"], skip)
    tasks = scorer.readable_tasks(layout.model("seed"), tasks, cfg.linear_probe)
    val_tasks = scorer.readable_tasks(layout.model("seed"), val_tasks, False)
    encoder = load_run_encoder(layout.embed, device)
    metas = [task_metadata(t, encoder) for t in tasks]
    val_metas = [task_metadata(t, encoder)[0] for t in val_tasks]
    del encoder

    registry = read_registry(layout)
    system, expert_list = main_system(layout)
    experts = [e.name for e in expert_list]
    singles = {"seed": layout.model("seed")} | {name: layout.model(name) for name in ("baseline", "baseline_1x")
                                                if registry.get(name)}  # baseline_1x: the paper's accounting
    if ctx.hooks.pool is not None:  # every model's image features on the cluster, then read from the cache
        models = [*singles.values(), *system.models,
                  *(m for v in cfg.ablations for m in ablation_system(layout, v).models),
                  *(layout.ablation(v).model("baseline") for v in cfg.ablations if phase_baseline(v))]
        gpu, both = is_cuda(device), tasks + val_tasks
        run_jobs(ctx.hooks.pool, [Call(warm_features, (scorer, "cuda" if gpu else "cpu", m, both,
                                                        [cfg.linear_probe] * len(tasks) + [False] * len(val_tasks)),
                                       name=f"features-{Path(m).name}") for m in dict.fromkeys(models)], gpu=gpu)
    rows, validation = Rows(), {}
    for name, path in tqdm(list(singles.items()), desc="evaluate", unit="model"):
        for task, scores in zip(tasks, scorer.model_scores(path, tasks)):
            rows.add(task, name, single(view(task), scores))
        for task, scores in zip(val_tasks, scorer.model_scores(path, val_tasks)):
            validation.setdefault(task.name, {"kind": task.kind})[name] = single(view(task), scores)[0]
    stacked = system.scores(tasks, scorer)
    for t, task in enumerate(tasks):
        for e, name in enumerate(experts):
            rows.add(task, name, single(view(task), stacked[t][e]))
        rows.add(task, UNIFORM, ensemble(view(task), stacked[t], None))
    lambdas = {"MoDE": lambda_on_validation(system, val_tasks, val_metas, scorer, cfg.lam)}
    routings = routed_rows(rows, "MoDE", system, tasks, [m for m, _ in metas], stacked, lambdas["MoDE"]["value"],
                           {ROUTED: cfg.routing, RELEASED: "released", COARSE: "coarse"} if cfg.routing == "paper"
                           else {ROUTED: cfg.routing})
    for task in tasks:
        metric = HEADLINE[task.kind]
        best = max(experts, key=lambda e: rows.metrics[task.name][e][metric])
        rows.metrics[task.name][ORACLE] = {**rows.metrics[task.name][best], "expert": best}
    ablation_names, ablation_variants, references = [], {}, {}
    for variant in cfg.ablations:
        v_system = ablation_system(layout, variant)
        v_stacked = v_system.scores(tasks, scorer)
        reference = phase_baseline(variant)
        if reference:  # the single model continued from the same seed epoch as these experts
            for task, scores in zip(tasks, scorer.model_scores(layout.ablation(variant).model("baseline"), tasks)):
                rows.add(task, reference, single(view(task), scores))
            ablation_names.append(reference)
            ablation_variants[reference] = variant
            for e, model in enumerate(v_system.models):  # each expert of this length alone, as the run's are
                row = f"{variant} {Path(model).name}"
                for t, task in enumerate(tasks):
                    rows.add(task, row, single(view(task), v_stacked[t][e]))
                ablation_names.append(row)
                ablation_variants[row], references[row] = variant, reference
        for row, routed in ablation_rows(variant, v_system.router.experts):
            if reference:
                references[row] = reference
            ablation_names.append(row)
            ablation_variants[row] = variant
            if routed:
                lambdas[variant] = lambda_on_validation(v_system, val_tasks, val_metas, scorer, cfg.lam)
                routed_rows(rows, variant, v_system, tasks, [m for m, _ in metas], v_stacked,
                            lambdas[variant]["value"], {row: cfg.routing})
            else:
                for t, task in enumerate(tasks):
                    rows.add(task, row, ensemble(view(task), v_stacked[t], None))
    main = list(singles) + experts + [UNIFORM, ROUTED]
    if cfg.routing == "paper":
        main += [RELEASED, COARSE]
    results: dict = {"routing": cfg.routing, "lam": lambdas["MoDE"]["value"], "lambda": lambdas, "tasks": {},
                     "rows": main + [ORACLE] + ablation_names, "ablation_rows": ablation_variants,
                     "validation": validation} | ({"references": references} if references else {})
    if cfg.linear_probe:
        results["linear_probe"] = linear_probes(tasks, singles | dict(zip(experts, system.models)), experts,
                                                scorer, tuple(cfg.probe_shots))
    for t, task in enumerate(tasks):
        results["tasks"][task.name] = {
            "kind": task.kind, **rows.metrics[task.name],
            "routing_weights": routings[cfg.routing][t]["weights"].tolist(), "num_images": num_images(task),
            "unreadable_images": len(task.unreadable),
            **({"num_classes": len(task.classnames)} if task.kind == "classification" else
               {"num_captions": len(task.captions)}),
        }
    unreadable = {t.name: t.unreadable for t in [*tasks, *val_tasks] if t.unreadable}
    if unreadable:
        results["unreadable_images"] = unreadable
    routing_log = {task.name: routing_entry(routings[cfg.routing][t], metas[t], system.router)
                   for t, task in enumerate(tasks)}
    atomic_write_json(layout.results, results)
    atomic_write_json(layout.routing_log, routing_log)
    exported = write_field_formats(results, layout)
    with atomic_path(layout.per_sample) as tmp:
        pq.write_table(rows.table(), tmp)
    atomic_write_text(layout.results_markdown, markdown_report(results))
    outputs = [layout.results, layout.routing_log, layout.per_sample, layout.results_markdown, *exported,
               *plot_report(results, layout)]
    return StageResult(
        outputs=hash_outputs(layout.evaluate, outputs),
        counts={"tasks": len(tasks), "validation_tasks": len(val_tasks),
                "images": int(sum(t.images.total for t in tasks)), "models": len(singles) + len(experts),
                "images_scored": int(sum(num_images(t) for t in tasks)),
                "images_unreadable": int(sum(len(t.unreadable) for t in tasks)),
                "added_experts": sum(e.added for e in expert_list),
                "stale_added_experts": len(current_added(layout)[1])},
        extra={"device": device},
    )


def routing_entry(routing: dict, meta: tuple[np.ndarray, list[str]], router: Router) -> dict:
    """A task's routing for the log: weights, and every class name's (or query's) nearest fine centre."""
    embeddings, texts = meta
    nearest, dist = nearest_fine(embeddings, router.fine_centroids)
    out = {"weights": routing["weights"].tolist(),
           "metadata": [{"text": t, "nearest_fine": int(f), "owners": np.flatnonzero(router.owns[:, f]).tolist(),
                         "distance": round(float(d), 4)} for t, f, d in zip(texts, nearest, dist)]}
    if "query_weights" in routing:
        out["query_weights"] = np.round(routing["query_weights"], 5).tolist()
    return out


def reports(ctx: StageContext, manifest: dict) -> list[Report]:
    """The results table, and the routing weights per task."""
    results = json.loads(ctx.layout.results.read_text(encoding="utf-8"))
    rows = [{"task": t, **{f"expert {e}": round(w, 3) for e, w in enumerate(v["routing_weights"])}}
            for t, v in results["tasks"].items()]
    return [Report("results", "MoDE evaluation: seed, baseline, experts, ensembles",
                   markdown=ctx.layout.results_markdown.read_text(encoding="utf-8")),
            Report("routing", "Routing weights per task", table=rows)]


STAGE = Stage(name="evaluate", section="evaluate", reads=("embed", "cluster", "train"), fingerprint=fingerprint,
              work=work, reports=reports, on_cluster=True, role=SCORES, summary=lambda layout: layout.results_markdown)
