"""`moda add-expert`: train one more expert later, without touching the existing ones.

Three ways (MoDE section 5.5 and the retrieval-enhanced variant):

- `new-data`: new shards arrive. They are embedded with the run's own encoder,
  assigned to the existing fine centres (which never move), split into a
  shard set of their own (every bad sample counted, as in the split stage),
  and a new expert is trained on them. It owns, for routing, the fine
  clusters that hold `add_expert.coverage` of the new samples.
- `split-widest`: the widest existing expert (largest spread of its fine
  centres around its coarse centre, the paper's training priority) has its
  fine clusters cut in two; the new expert trains on the wider half's samples.
  Each further call takes the widest expert not split yet.
- `task`: a task's class names (a task folder's `task.json`, or names given
  directly) pick their `add_expert.fine_per_class` nearest fine clusters; the
  new expert trains on those clusters' samples.

For `split-widest` and `task` the samples are read from the existing
experts' shards (already validated) and written to the new expert's own
shard set; a selected sample the split stage had rejected is counted, never
lost: selected = written + rejected_by_split.

Every new expert starts from the run's seed exactly as the original experts
did (`train.expert_init`), trains for `train.expert_epochs`, and is registered
in `added/registry.json` (experts/registry.py). Its files live under
`runs/<name>/added/expert_<id>/`; nothing under embed/, cluster/, split/ or
train/ is written, so the next `moda/full` still skips every stage, and
evaluate reruns because its fingerprint includes the added registry.

Restartable: each request has a fingerprint (request, its inputs, the config
sections it uses, the cluster and train fingerprints). A request already
registered is skipped; a killed one reuses its folder and id, and its inner
steps (embed, split, training checkpoints) resume by their own fingerprints.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clustering.assign import assign_files, write_assignments
from clustering.embed import STAGE as EMBED
from clustering.embeddings import embedding_files
from clustering.encoder import load_run_encoder, run_encoder_spec
from clustering.incremental import covering_fine_clusters, task_fine_clusters, widest_expert, widest_part
from evaluation.tasks import task_spec
from experts.jobs import expert_job, world_size
from experts.launch import gpu_slots, run_gpus, trainer_device
from experts.models import model_files, read_model_config
from experts.registry import current_added, read_added, read_registry, register_added
from experts.shard_sets import check_shard_counts, shard_set, shard_set_fingerprint
from experts.split.stage import STAGE as SPLIT
from experts.subset import subset_stage
from experts.train import expert_start, train_job
from pipelines.core.config import Config, section_hash
from pipelines.core.devices import pick_device
from pipelines.core.layout import TASK_FILE, RunLayout, expert_id, expert_name, shard_id
from pipelines.core.manifest import (
    atomic_write_json,
    combine,
    file_sha256,
    hash_outputs,
    read_manifest,
    require_manifest,
    source_hashes,
    write_manifest,
)
from pipelines.core.shard_url import ShardURL
from pipelines.core.stage import Fingerprint, Hooks, Stage, StageContext, StageResult, run_stage
from pipelines.run.stages import layout_of
from pipelines.shardio.shards import expand_shards
from routing.metadata import classname_embeddings
from routing.prompts import DEFAULT_TEMPLATES

MODES = ("new-data", "split-widest", "task")


@dataclass(frozen=True)
class AddRequest:
    """What to add. `new_data`: shards (folder, glob or brace pattern) for `new-data`;
    `task`: a task folder with task.json, or `classnames` (+ `templates`), for `task`."""

    mode: str
    new_data: str = ""
    task: str = ""
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> AddRequest:
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"add-expert: unknown field(s) {unknown}; fields are "
                             f"{sorted(cls.__dataclass_fields__)}")
        raw = {**raw, "classnames": tuple(raw.get("classnames") or ()),
               "templates": tuple(raw.get("templates") or ())}
        return cls(**raw)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"add-expert: unknown mode {self.mode!r}; modes are {list(MODES)}")
        if self.mode == "new-data" and not self.new_data:
            raise ValueError("add-expert --mode new-data needs the new shards (--new-data)")
        if self.mode == "task" and not (self.task or self.classnames):
            raise ValueError("add-expert --mode task needs a task folder (--task) or class names (--classes)")

    def task_metadata(self) -> tuple[list[str], list[str]]:
        """(class names, prompt templates) of a task request."""
        if self.classnames:
            return list(self.classnames), list(self.templates) or DEFAULT_TEMPLATES
        folder = Path(self.task)
        if not folder.is_dir():
            raise FileNotFoundError(f"add-expert --task: {folder} not found (a moda task folder or a "
                                    "clip_benchmark set)")
        spec = task_spec(folder)  # moda's task.json or a clip_benchmark set, as evaluation reads them
        if spec["kind"] != "classification":
            raise ValueError(f"add-expert --task {folder}: a task-targeted expert needs class names "
                             "(a classification task)")
        return spec["classnames"], list(self.templates) or spec["templates"]


@dataclass
class Selection:
    """The new expert's fine clusters and how they were chosen."""

    fine_clusters: np.ndarray
    detail: dict = field(default_factory=dict)


def run_add_expert(cfg: Config, run_dir: str | Path | RunLayout | None, request: AddRequest,
                   hooks: Hooks = Hooks()) -> dict:
    """Add one expert to a trained run; return its manifest (with "skipped" when already added)."""
    started = time.time()
    request.check()
    layout = layout_of(cfg, run_dir)
    train = require_manifest(layout.train, "train")
    cluster = require_manifest(layout.cluster, "cluster")
    sources = _request_sources(request)
    # split-widest takes the widest expert not split yet: each call adds the next one in the
    # paper's priority order, so what was split already is part of the request.
    already_split = sorted(e["selection"]["split_from"] for e in current_added(layout)[0]
                           if e["mode"] == "split-widest") if request.mode == "split-widest" else []
    fingerprint = combine("add-expert", asdict(request), sources, section_hash(cfg.add_expert),
                          section_hash(cfg.split), section_hash(cfg.train), cluster["fingerprint"],
                          train["fingerprint"], already_split)
    for entry in read_added(layout):
        if entry["request_fingerprint"] == fingerprint:
            return {**(read_manifest(layout.added_expert(entry["name"]).root) or {}), "skipped": True}
    number = _pending_id(layout, fingerprint)
    if number is None:
        number = _next_id(layout)
    name = expert_name(number)
    work = layout.added_expert(name)
    atomic_write_json(work.request, {"fingerprint": fingerprint, "request": asdict(request)})

    fine_centroids = np.load(layout.fine_centroids)
    if request.mode == "new-data":
        selection = new_data_expert(cfg, layout, work, request.new_data, fine_centroids)
    else:
        if request.mode == "split-widest":
            selection = select_widest(layout, cfg.cluster.seed, exclude=already_split)
        else:
            selection = select_for_task(cfg, layout, fine_centroids, request)
        subset = subset_stage(layout, selection.fine_clusters, fingerprint)
        run_stage(subset, StageContext(cfg.split, cfg.data, work, {}))

    checkpoint = train_added(cfg, layout, work, name, fingerprint, hooks)
    samples = sum(shard_set(work.expert_shards(0))[1].values())
    entry = {
        "id": number, "name": name, "mode": request.mode, "request": asdict(request),
        "model_dir": str(work.model(name).relative_to(layout.root)),
        "fine_clusters": selection.fine_clusters.tolist(), "samples": samples,
        "data_manifest_sha256": shard_set_fingerprint(work.expert_shards(0)),
        "checkpoint": str(checkpoint.relative_to(layout.root)),
        "seeded_from": "seed", "selection": selection.detail,
        "request_fingerprint": fingerprint, "train_fingerprint": train["fingerprint"],
        "cluster_fingerprint": cluster["fingerprint"],
    }
    manifest = write_manifest(
        work.root, stage="add-expert", fingerprint=fingerprint, config_hash=section_hash(cfg.add_expert),
        inputs={"train": train["fingerprint"], "cluster": cluster["fingerprint"], **sources},
        outputs=hash_outputs(work.root, model_files(work.model(name))),
        counts={"samples": samples, "fine_clusters": len(entry["fine_clusters"])},
        started=started, extra={"expert": entry},
    )
    register_added(layout, entry)  # last: an expert is served only once it is complete
    return manifest


def _request_sources(request: AddRequest) -> dict[str, str]:
    """Content fingerprints of what a request reads besides the run (new shards, task.json)."""
    if request.mode == "new-data":
        shards = expand_shards(request.new_data)
        digests = source_hashes(shards)  # sha256, or a remote shard's listed size and version
        return {f"new:{p.name}": digests[shard_id(p)] for p in shards}
    if request.mode == "task" and request.task and not request.classnames:
        return {TASK_FILE: file_sha256(Path(request.task) / TASK_FILE)}
    return {}


def _pending_id(layout: RunLayout, fingerprint: str) -> int | None:
    """The id of an unfinished earlier attempt at the same request (a killed run)."""
    for folder in sorted(p for p in layout.added.glob("expert_*") if p.is_dir()):
        request = layout.added_expert(folder.name).request
        if request.is_file() and json.loads(request.read_text(encoding="utf-8"))["fingerprint"] == fingerprint:
            return expert_id(folder.name)
    return None


def _next_id(layout: RunLayout) -> int:
    """One past every id in use: the train stage's experts, added ones, and unfinished folders."""
    used = [e["id"] for e in read_registry(layout)["experts"]]
    used += [e["id"] for e in read_added(layout)]
    used += [expert_id(p.name) for p in layout.added.glob("expert_*") if p.is_dir()]
    return max(used) + 1


# ---------------------------------------------------------------- selections
def select_widest(layout: RunLayout, seed: int, exclude: list[str] = ()) -> Selection:
    """The wider half of the widest original expert's fine clusters, skipping experts in `exclude`."""
    report = json.loads(layout.cluster_report.read_text(encoding="utf-8"))
    fine_centroids = np.load(layout.fine_centroids)
    expert_of_fine = np.load(layout.expert_of_fine)
    spreads = np.array(report["expert_spread"], dtype=np.float64)
    spreads[[expert_id(name) for name in exclude]] = -np.inf
    if np.isneginf(spreads).all():
        raise ValueError("add-expert --mode split-widest: every expert has been split once already; "
                         "add an expert with --mode task or --mode new-data")
    widest = widest_expert(spreads)
    part = widest_part(fine_centroids, np.flatnonzero(expert_of_fine == widest),
                       np.array(report["fine_sizes"], dtype=np.float64), seed=seed)
    return Selection(part, {"split_from": expert_name(widest), "spread": report["expert_spread"][widest]})


def select_for_task(cfg: Config, layout: RunLayout, fine_centroids: np.ndarray, request: AddRequest) -> Selection:
    """Each class name's nearest fine clusters, embedded with the run's encoder."""
    classnames, templates = request.task_metadata()
    encoder = load_run_encoder(layout.embed, cfg.evaluate.device)
    embeddings = classname_embeddings(encoder, classnames, templates)
    fine = task_fine_clusters(embeddings, fine_centroids, cfg.add_expert.fine_per_class)
    return Selection(fine, {"classnames": classnames, "templates": templates,
                            "fine_per_class": cfg.add_expert.fine_per_class})


# ---------------------------------------------------------------- new data
def assign_stage(run: RunLayout, fine_centroids: np.ndarray) -> Stage:
    """The cluster stage of an added expert's folder: its new samples assigned to the run's fine
    centres (which never move), all to one expert."""

    def fingerprint(ctx: StageContext) -> Fingerprint:
        embed_fp = ctx.upstream["embed"]["fingerprint"]
        value = combine("add-assign", embed_fp, file_sha256(run.fine_centroids))
        return Fingerprint(value, "", {"embed": embed_fp})

    def work(ctx: StageContext, fp: Fingerprint) -> StageResult:
        layout = ctx.layout
        files = embedding_files(layout, ctx.upstream["embed"])
        fine_per_file, inertia = assign_files(files, fine_centroids)
        expert_of_fine = np.zeros(fine_centroids.shape[0], dtype=np.int32)  # all new data: one expert
        write_assignments(layout.assignments, files, fine_per_file, expert_of_fine, None)
        fine = np.concatenate(fine_per_file)
        atomic_write_json(layout.fine_counts, np.bincount(fine, minlength=fine_centroids.shape[0]).tolist())
        return StageResult(outputs=hash_outputs(layout.cluster, [layout.assignments, layout.fine_counts]),
                           counts={"samples": int(fine.size), "inertia_per_sample": inertia / max(1, fine.size)},
                           extra={"num_fine": int(fine_centroids.shape[0]), "num_experts": 1})

    return Stage(name="assign to the run's centres", section="cluster", reads=("embed",), fingerprint=fingerprint,
                 work=work, writes="cluster")


def new_data_expert(cfg: Config, run: RunLayout, work: RunLayout, new_data: str,
                    fine_centroids: np.ndarray) -> Selection:
    """Embed new shards with the run's encoder, assign them to the fine centres, split them: the
    embed and split stages themselves, run in the new expert's folder."""
    model, pooling = run_encoder_spec(run.embed)
    embed_cfg = dataclasses.replace(cfg.embed, model=model, pooling=pooling, simcse_steps=0,
                                    precision=require_manifest(run.embed, "embed").get("precision", "auto"))
    data = dataclasses.replace(cfg.data, train_shards=new_data)
    embed = run_stage(EMBED, StageContext(embed_cfg, data, work, {}))
    if not embed["counts"]["embedded"]:
        raise ValueError(f"add-expert: no usable caption in the new shards at {new_data!r}")
    assign = assign_stage(run, fine_centroids)
    run_stage(assign, StageContext(cfg.cluster, data, work, {"embed": embed}))
    upstream = {"embed": embed, "cluster": require_manifest(work.cluster, "cluster")}
    split = run_stage(SPLIT, StageContext(cfg.split, data, work, upstream))
    counts = np.array(json.loads(work.fine_counts.read_text()))
    owned = covering_fine_clusters(counts, cfg.add_expert.coverage)
    shards = expand_shards(new_data)
    return Selection(owned, {"new_shards": [str(p) if isinstance(p, ShardURL) else str(p.resolve()) for p in shards],
                             "samples_in": split["counts"]["samples_in"], "rejected": split["counts"]["rejected"],
                             "coverage": cfg.add_expert.coverage, "covered": float(counts[owned].sum() / counts.sum())})


# ---------------------------------------------------------------- training
def train_added(cfg: Config, run: RunLayout, work: RunLayout, name: str, fingerprint: str, hooks: Hooks) -> Path:
    """Train the new expert from the run's seed, as the train stage trains every expert."""
    t = cfg.train
    registry = read_registry(run)
    model_cfg = read_model_config(run.model_config)
    seed_ckpt = Path(registry["seed"]["checkpoint"])
    if not seed_ckpt.is_file():
        raise FileNotFoundError(f"the run's seed checkpoint {seed_ckpt} is gone: rerun the train stage")
    work.train.mkdir(parents=True, exist_ok=True)
    start = expert_start(t, seed_ckpt, int(registry["seed"]["epochs"]), work)
    paths, sizes = shard_set(work.expert_shards(0))
    device = pick_device(t.device)
    gpus = run_gpus(device, t.gpus)
    device = trainer_device(device)
    slot = gpu_slots(gpus, t.gpus_per_expert)[0]
    check_shard_counts(t, {"the new expert": list(sizes.values())}, world_size(t, len(slot)))
    job = expert_job(t, name, paths, start, combine(name, fingerprint, shard_set_fingerprint(work.expert_shards(0))))
    return train_job(t, job, layout=work, model_spec=f"local-dir:{run.model_config.resolve()}", model_cfg=model_cfg,
                     device=device, gpus=slot or None, hooks=hooks)
