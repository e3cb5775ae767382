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

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clustering.incremental import covering_fine_clusters, task_fine_clusters, widest_expert, widest_part
from experts.registry import ADDED_DIR, current_added, read_added, read_registry, register_added
from experts.split import expert_dir_name, expert_shards
from pipelines.config import Config, section_hash
from pipelines.manifest import (
    atomic_write_json,
    combine,
    file_sha256,
    hash_outputs,
    is_done,
    read_manifest,
    require_manifest,
    write_manifest,
)
from pipelines.shards import ShardSetWriter, expand_shards, iter_samples
from pipelines.stages import run_paths

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
    def from_dict(cls, raw: dict) -> "AddRequest":
        unknown = sorted(set(raw) - {f for f in cls.__dataclass_fields__})
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
            return list(self.classnames), list(self.templates) or ["a photo of a {}."]
        spec_path = Path(self.task) / "task.json"
        if not spec_path.is_file():
            raise FileNotFoundError(f"add-expert --task: {spec_path} not found")
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        if not spec.get("classnames"):
            raise ValueError(f"{spec_path}: a task-targeted expert needs class names (a classification task)")
        return spec["classnames"], list(self.templates) or spec.get("templates") or ["a photo of a {}."]


@dataclass
class Selection:
    """The new expert's fine clusters and how they were chosen."""

    fine_clusters: np.ndarray
    detail: dict = field(default_factory=dict)


def run_add_expert(cfg: Config, run_dir: str | Path | None, request: AddRequest,
                   on_line: Callable[[str, str], None] | None = None) -> dict:
    """Add one expert to a trained run; return its manifest (with "skipped" when already added)."""
    started = time.time()
    request.check()
    paths = run_paths(cfg, run_dir)
    root = paths["root"]
    train = require_manifest(paths["train"], "train")
    cluster = require_manifest(paths["cluster"], "cluster")
    sources = _request_sources(request)
    # split-widest takes the widest expert not split yet: each call adds the next one in the
    # paper's priority order, so what was split already is part of the request.
    already_split = sorted(e["selection"]["split_from"] for e in current_added(root)[0]
                           if e["mode"] == "split-widest") if request.mode == "split-widest" else []
    fingerprint = combine("add-expert", asdict(request), sources, section_hash(cfg.add_expert),
                          section_hash(cfg.split), section_hash(cfg.train), cluster["fingerprint"],
                          train["fingerprint"], already_split)
    for entry in read_added(root):
        if entry["request_fingerprint"] == fingerprint:
            work = root / ADDED_DIR / entry["name"]
            return {**(read_manifest(work) or {}), "skipped": True}
    expert_id = _pending_id(root, fingerprint)
    if expert_id is None:
        expert_id = _next_id(root)
    name = expert_dir_name(expert_id)
    work = root / ADDED_DIR / name
    atomic_write_json(work / "request.json", {"fingerprint": fingerprint, "request": asdict(request)})

    fine_centroids = np.load(paths["cluster"] / "fine_centroids.npy")
    if request.mode == "new-data":
        selection, split_dir = new_data_expert(cfg, root, work, expand_shards(request.new_data), fine_centroids)
    else:
        if request.mode == "split-widest":
            selection = select_widest(paths["cluster"], cfg.cluster.seed, exclude=already_split)
        else:
            selection = select_for_task(cfg, root, fine_centroids, request)
        split_dir = write_subset(cfg, root, work / "split", selection.fine_clusters, fingerprint)

    checkpoint = train_added(cfg, root, work, name, split_dir, fingerprint, on_line)
    data_hash = file_sha256(split_dir / expert_dir_name(0) / "manifest.json")
    samples = sum(expert_shards(split_dir, 0)[1].values())
    entry = {
        "id": expert_id, "name": name, "mode": request.mode, "request": asdict(request),
        "model_dir": str((work / "train" / name).relative_to(root)),
        "fine_clusters": selection.fine_clusters.tolist(), "samples": samples,
        "data_manifest_sha256": data_hash, "checkpoint": str(checkpoint.relative_to(root)),
        "seeded_from": "seed", "selection": selection.detail,
        "request_fingerprint": fingerprint, "train_fingerprint": train["fingerprint"],
        "cluster_fingerprint": cluster["fingerprint"],
    }
    model_dir = work / "train" / name
    outputs = hash_outputs(work, [model_dir / "open_clip_config.json", model_dir / "open_clip_model.safetensors"])
    manifest = write_manifest(
        work, stage="add-expert", fingerprint=fingerprint, config_hash=section_hash(cfg.add_expert),
        inputs={"train": train["fingerprint"], "cluster": cluster["fingerprint"], **sources},
        outputs=outputs,
        counts={"samples": samples, "fine_clusters": len(entry["fine_clusters"])},
        started=started, extra={"expert": entry},
    )
    register_added(root, entry)  # last: an expert is served only once it is complete
    return manifest


def _request_sources(request: AddRequest) -> dict[str, str]:
    """Content fingerprints of what a request reads besides the run (new shards, task.json)."""
    if request.mode == "new-data":
        return {f"new:{p.name}": file_sha256(p) for p in expand_shards(request.new_data)}
    if request.mode == "task" and request.task and not request.classnames:
        return {"task.json": file_sha256(Path(request.task) / "task.json")}
    return {}


def _pending_id(root: Path, fingerprint: str) -> int | None:
    """The id of an unfinished earlier attempt at the same request (a killed run)."""
    for request_file in sorted((root / ADDED_DIR).glob("expert_*/request.json")):
        if json.loads(request_file.read_text(encoding="utf-8"))["fingerprint"] == fingerprint:
            return int(request_file.parent.name.split("_")[1])
    return None


def _next_id(root: Path) -> int:
    """One past every id in use: the train stage's experts, added ones, and unfinished folders."""
    used = [e["id"] for e in read_registry(root / "train")["experts"]]
    used += [e["id"] for e in read_added(root)]
    used += [int(p.name.split("_")[1]) for p in (root / ADDED_DIR).glob("expert_*") if p.is_dir()]
    return max(used) + 1


# ---------------------------------------------------------------- selections
def select_widest(cluster_dir: Path, seed: int, exclude: list[str] = ()) -> Selection:
    """The wider half of the widest original expert's fine clusters, skipping experts in `exclude`."""
    report = json.loads((cluster_dir / "report.json").read_text(encoding="utf-8"))
    fine_centroids = np.load(cluster_dir / "fine_centroids.npy")
    expert_of_fine = np.load(cluster_dir / "expert_of_fine.npy")
    spreads = np.array(report["expert_spread"], dtype=np.float64)
    spreads[[int(name.split("_")[1]) for name in exclude]] = -np.inf
    if np.isneginf(spreads).all():
        raise ValueError("add-expert --mode split-widest: every expert has been split once already; "
                         "add an expert with --mode task or --mode new-data")
    widest = widest_expert(spreads)
    part = widest_part(fine_centroids, np.flatnonzero(expert_of_fine == widest),
                       np.array(report["fine_sizes"], dtype=np.float64), seed=seed)
    return Selection(part, {"split_from": expert_dir_name(widest),
                            "spread": report["expert_spread"][widest]})


def select_for_task(cfg: Config, root: Path, fine_centroids: np.ndarray, request: AddRequest) -> Selection:
    """Each class name's nearest fine clusters, embedded with the run's encoder."""
    from clustering.embed import load_run_encoder
    from routing.metadata import classname_embeddings

    classnames, templates = request.task_metadata()
    encoder = load_run_encoder(root / "embed", cfg.evaluate.device)
    embeddings = classname_embeddings(encoder, classnames, templates)
    fine = task_fine_clusters(embeddings, fine_centroids, cfg.add_expert.fine_per_class)
    return Selection(fine, {"classnames": classnames, "templates": templates,
                            "fine_per_class": cfg.add_expert.fine_per_class})


# ---------------------------------------------------------------- data
def new_data_expert(cfg: Config, root: Path, work: Path, shards: list[Path],
                    fine_centroids: np.ndarray) -> tuple[Selection, Path]:
    """Embed new shards with the run's encoder, assign them to the fine centres, split them."""
    import dataclasses

    from clustering.cluster import assign_files, write_assignments
    from clustering.embed import embedding_files, run_embed
    from experts.split import run_split

    run_embed_manifest = require_manifest(root / "embed", "embed")
    adapted = run_embed_manifest.get("encoder")
    embed_cfg = dataclasses.replace(cfg.embed, model=run_embed_manifest["model"],
                                    pooling=run_embed_manifest.get("pooling", cfg.embed.pooling), simcse_steps=0)
    encoder_path = (root / "embed" / adapted) if adapted else None
    embed = run_embed(embed_cfg, shards, work / "embed", encoder_path=encoder_path)
    files = embedding_files(work / "embed", embed)
    if not embed["counts"]["embedded"]:
        raise ValueError(f"add-expert: no usable caption in the new shards {[str(p) for p in shards[:3]]}")
    assign_dir = work / "cluster"
    fingerprint = combine("add-assign", embed["fingerprint"], file_sha256(root / "cluster" / "fine_centroids.npy"))
    if not is_done(assign_dir, fingerprint):
        fine_per_file, inertia = assign_files(files, fine_centroids)
        expert_of_fine = np.zeros(fine_centroids.shape[0], dtype=np.int32)  # all new data: one expert
        write_assignments(assign_dir / "assignments.parquet", files, fine_per_file, expert_of_fine, None)
        fine = np.concatenate(fine_per_file)
        atomic_write_json(assign_dir / "fine_counts.json",
                          np.bincount(fine, minlength=fine_centroids.shape[0]).tolist())
        write_manifest(assign_dir, stage="cluster", fingerprint=fingerprint, config_hash="",
                       inputs={"embed": embed["fingerprint"]},
                       outputs=hash_outputs(assign_dir, [assign_dir / "assignments.parquet",
                                                         assign_dir / "fine_counts.json"]),
                       counts={"samples": int(fine.size), "inertia_per_sample": inertia / max(1, fine.size)},
                       started=time.time(), extra={"num_fine": int(fine_centroids.shape[0]), "num_experts": 1})
    counts = np.array(json.loads((assign_dir / "fine_counts.json").read_text()))
    split = run_split(cfg.split, shards, work / "embed", assign_dir, work / "split")
    owned = covering_fine_clusters(counts, cfg.add_expert.coverage)
    detail = {"new_shards": [str(p.resolve()) for p in shards], "samples_in": split["counts"]["samples_in"],
              "rejected": split["counts"]["rejected"], "coverage": cfg.add_expert.coverage,
              "covered": float(counts[owned].sum() / counts.sum())}
    return Selection(owned, detail), work / "split"


def write_subset(cfg: Config, root: Path, split_dir: Path, fine_clusters: np.ndarray, fingerprint: str) -> Path:
    """The samples of `fine_clusters`, read from the owning experts' shards, as one new shard set.

    Out-of-cluster copies in the source shards are skipped (each sample is
    read from its own expert's shards), so nothing is written twice.
    Conservation: selected = written + rejected by the split stage.
    """
    started = time.time()
    run_split_dir = root / "split"
    split_manifest = require_manifest(run_split_dir, "split")
    step_fp = combine("subset", fingerprint, split_manifest["fingerprint"], fine_clusters.tolist())
    if is_done(split_dir, step_fp):
        return split_dir
    table = pq.read_table(root / "cluster" / "assignments.parquet", columns=["key", "fine", "expert"])
    wanted = np.isin(table.column("fine").to_numpy(), fine_clusters)
    keys = np.array(table.column("key").to_pylist(), dtype=object)[wanted]
    owners = table.column("expert").to_numpy()[wanted]
    selected_by_expert = {int(e): set(keys[owners == e]) for e in np.unique(owners)}
    selected = int(wanted.sum())
    if not selected:
        raise ValueError("add-expert: the chosen fine clusters hold no samples")
    out = split_dir / expert_dir_name(0)
    shutil.rmtree(out, ignore_errors=True)
    shard_size = max(1, min(cfg.split.shard_size, math.ceil(selected / cfg.split.min_shards)))
    writer = ShardSetWriter(out, shard_size)
    found: set[str] = set()
    for expert, wanted_keys in sorted(selected_by_expert.items()):
        for path in expert_shards(run_split_dir, expert)[0]:
            for sample in iter_samples(path):
                if sample.key in wanted_keys and sample.key not in found:
                    writer.write(sample.key, sample.files)
                    found.add(sample.key)
    sizes = writer.close()
    split_rejected = set(pq.read_table(run_split_dir / "rejects.parquet", columns=["key"]).column("key").to_pylist())
    missing = [k for keys_ in selected_by_expert.values() for k in keys_ if k not in found]
    lost = [k for k in missing if k not in split_rejected]
    if lost:
        raise RuntimeError(f"add-expert: {len(lost)} selected samples are in no expert shard and were not "
                           f"rejected by the split, e.g. {lost[:5]}: rerun the split stage (moda verify)")
    shard_hashes = dict(writer.hashes)  # hashed while written
    atomic_write_json(out / "manifest.json", {
        "expert": 0, "samples": sum(sizes.values()), "sizes": sizes, "shards_sha256": shard_hashes,
        "source_experts": [expert_dir_name(e) for e in sorted(selected_by_expert)],
        "fine_clusters": fine_clusters.tolist(), "shard_size": shard_size,
    })
    write_manifest(
        split_dir, stage="split", fingerprint=step_fp, config_hash=section_hash(cfg.split),
        inputs={"split": split_manifest["fingerprint"]},
        outputs=hash_outputs(split_dir, sorted(out.iterdir())),
        counts={"selected": selected, "written": sum(sizes.values()), "rejected_by_split": len(missing),
                "experts": [sum(sizes.values())]},
        started=started, extra={"num_experts": 1},
    )
    return split_dir


# ---------------------------------------------------------------- training
def train_added(cfg: Config, root: Path, work: Path, name: str, split_dir: Path, fingerprint: str,
                on_line: Callable[[str, str], None] | None) -> Path:
    """Train the new expert from the run's seed, as the train stage trains every expert."""
    from experts.launch import gpu_slots, visible_gpus
    from experts.train import Job, train_job, tune_epochs, weights_only
    from pipelines.devices import pick_device

    t = cfg.train
    registry = read_registry(root / "train")
    arch_dir = (root / "train" / "model_config").resolve()
    model_cfg = json.loads((arch_dir / "open_clip_config.json").read_text(encoding="utf-8"))["model_cfg"]
    seed_ckpt = Path(registry["seed"]["checkpoint"])
    if not seed_ckpt.is_file():
        raise FileNotFoundError(f"the run's seed checkpoint {seed_ckpt} is gone: rerun the train stage")
    stage_dir = work / "train"
    stage_dir.mkdir(parents=True, exist_ok=True)
    if t.expert_init == "weights":
        start_ckpt, start_epoch = weights_only(seed_ckpt, stage_dir), 0
    else:
        start_ckpt, start_epoch = seed_ckpt, int(registry["seed"]["epochs"])
    paths, _ = expert_shards(split_dir, 0)
    device = pick_device(t.device)
    gpus = visible_gpus() if device == "cuda" else []
    slot = gpu_slots(gpus, t.gpus_per_expert)[0]
    if len(paths) < t.workers * max(1, len(slot)) and not t.dataset_resampled:
        raise ValueError(f"the new expert has {len(paths)} shard(s), fewer than the data loaders "
                         "open_clip_train needs: raise split.min_shards or set train.dataset_resampled")
    data_hash = file_sha256(split_dir / expert_dir_name(0) / "manifest.json")
    job = Job(name, "::".join(str(p.resolve()) for p in paths), None, start_epoch + t.expert_epochs,
              start_epoch, start_ckpt, combine(name, fingerprint, data_hash), tune_epochs(t, t.expert_epochs))
    return train_job(t, job, stage_dir=stage_dir, model_spec=f"local-dir:{arch_dir}", model_cfg=model_cfg,
                     device=device, gpus=slot or None, on_line=on_line)
