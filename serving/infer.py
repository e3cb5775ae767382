"""`moda infer SYSTEM SHARDS`: zero-shot labels or per-expert embeddings for a whole shard set.

A data engineer's job (score or filter 100M images) at LAION scale: 41,000 img2dataset shards,
local, on S3 or any fsspec store, read as the training shards are (pipelines/shardio). Each input
shard gives one parquet, `OUT/<shard>.parquet`, with one row per sample in the shard's order:

    key               the sample's key
    classes, scores   the top-k classes and the routed ensemble's probabilities (`--classes`)
    routing_weights   the class list's routing weights over every expert (the same on every row)
    expert_000, ...   each expert's unit image embedding (`--embed`)
    error             null, or why the sample has no prediction (its image does not decode, it
                      has none): counted and listed, never dropped

Why this shape:
- Streaming in bounded memory: a batch at a time, decoded on threads ahead of the model, one
  shard's rows held (a shard is ~10,000 samples, a few MB of predictions), remote shards fetched
  one ahead of the one being read.
- Resumable shard by shard: a parquet is written under a temporary name and renamed into place,
  with the request's fingerprint in its footer; a rerun skips every shard whose parquet carries the
  same fingerprint and redoes the rest (a parquet made by another request is redone). A run killed
  at any point and rerun ends with the bytes an uninterrupted run writes.
- Text features once: the class list is routed and each expert's classifier computed before the
  first image.
- `--top-experts k` runs only the k experts with the largest routing weights (renormalised):
  inference costs k models instead of n where routing gives the others little weight
  (bench/infer_top_experts.py measures the speed and the accuracy it costs).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from evaluation.clip_features import inference, to_device
from evaluation.image_stream import decode_threads, image_bytes, preprocessed_batches
from pipelines.core.layout import shard_id
from pipelines.core.manifest import atomic_path, atomic_write_json, combine
from pipelines.shardio.remote_shards import fetch_ahead, held
from pipelines.shardio.shards import ShardError, iter_samples, select_shards
from serving.predict import Classifier, MoDESystem

FINGERPRINT_KEY = b"moda_infer_fingerprint"
SUMMARY = "infer.json"


@dataclass(frozen=True)
class InferRequest:
    """What changes the output (fingerprinted) and how the work runs (not)."""

    classes: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    embed: bool = False
    top_k: int = 5
    top_experts: int | None = None
    batch_size: int = 256
    workers: int = -1
    missing_shards: str = "error"

    def check(self) -> None:
        if bool(self.classes) == self.embed:
            raise ValueError("moda infer: give exactly one of --classes FILE (zero-shot labels) or --embed")
        if self.top_k < 1 or (self.top_experts is not None and self.top_experts < 1):
            raise ValueError("moda infer: --top-k and --top-experts must be at least 1")
        if self.embed and self.top_experts:
            raise ValueError("moda infer: --top-experts routes by a class list; with --embed every expert runs")


def read_lines(path: str | Path, what: str) -> tuple[str, ...]:
    """A class or template file: one entry a line, blank lines and `#` comments left out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"moda infer: {what} file {path} not found")
    lines = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    found = tuple(line for line in lines if line and not line.startswith("#"))
    if not found:
        raise ValueError(f"moda infer: {what} file {path} lists nothing (one entry a line)")
    return found


def fingerprint(system: MoDESystem, request: InferRequest) -> str:
    return combine("infer", system.spec.fingerprint, system.routing, system.lam, request.classes, request.templates,
                   request.embed, request.top_k, request.top_experts)


def done(path: Path, fp: str) -> bool:
    """Whether `path` is a finished output of this request (its footer carries the fingerprint)."""
    if not path.is_file():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # a file cut short by something else than moda: redo it
        return False
    return meta.get(FINGERPRINT_KEY, b"").decode() == fp


def shard_samples(shard, notes: list[str]) -> Iterator[tuple[object, str, bytes | None]]:
    """(shard, key, image bytes) of every sample; a damaged shard's samples before the damage, the
    damage noted (the split and embed stages count it the same way)."""
    try:
        for sample in iter_samples(shard):
            yield shard, sample.key, image_bytes(sample.files) if sample.problem is None else b""
    except ShardError as err:
        notes.append(str(err))


def embedding_dim(system: MoDESystem) -> int:
    return int(system.model(0).model.visual.output_dim)


def schema(system: MoDESystem, ready: Classifier | None, fp: str, source: str, notes: list[str]) -> pa.Schema:
    fields = [pa.field("key", pa.string())]
    if ready is not None:
        fields += [pa.field("classes", pa.list_(pa.string())), pa.field("scores", pa.list_(pa.float32())),
                   pa.field("routing_weights", pa.list_(pa.float32(), len(system.expert_names)))]
    else:
        dim = embedding_dim(system)
        fields += [pa.field(name, pa.list_(pa.float32(), dim)) for name in system.expert_names]
    fields.append(pa.field("error", pa.string()))
    meta = {FINGERPRINT_KEY: fp.encode(), b"moda_source_shard": source.encode()}
    if notes:
        meta[b"moda_shard_damage"] = "; ".join(notes).encode()
    return pa.schema(fields, metadata=meta)


def infer_shard(system: MoDESystem, ready: Classifier | None, shard, out: Path, fp: str,
                request: InferRequest, progress: tqdm) -> dict:
    """One input shard to one parquet; its counts."""
    import torch

    experts = ready.experts if ready is not None else list(range(len(system.expert_names)))
    columns: dict[str, list] = {"key": [], "error": []}
    notes: list[str] = []
    workers = decode_threads(request.workers, system.device)
    with held(shard), inference(system.device):
        for batch in preprocessed_batches(shard_samples(shard, notes), system.preprocess, request.batch_size,
                                          workers, skip_unreadable=True):
            errors = [None] * batch.size
            for position, _, _, why in batch.unreadable:
                errors[position] = why
            readable = batch.readable
            features = []
            if batch.pixels is not None:
                pixels = to_device(batch.pixels, system.device)
                for e in experts:
                    encoded = system.model(e).model.encode_image(pixels).float()
                    features.append(torch.nn.functional.normalize(encoded, dim=-1).cpu().numpy())
            columns["key"] += batch.keys
            columns["error"] += errors
            add_rows(columns, system, ready, experts, features, readable, request.top_k)
            progress.update(batch.size)
    layout = schema(system, ready, fp, str(shard), notes)
    table = pa.Table.from_arrays([as_column(columns.get(f.name, []), f.type) for f in layout], schema=layout)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return {"rows": table.num_rows, "unreadable": sum(e is not None for e in columns["error"]), "damage": notes}


def as_column(values, kind: pa.DataType) -> pa.Array:
    """A column from python rows, or from (B, D) float32 batches with NaN rows for the missing."""
    if not pa.types.is_fixed_size_list(kind) or not values or not isinstance(values[0], np.ndarray):
        return pa.array(values, type=kind)
    stacked = np.concatenate(values).astype(np.float32)
    missing = np.isnan(stacked).any(axis=1)
    return pa.FixedSizeListArray.from_arrays(pa.array(np.nan_to_num(stacked).ravel()), kind.list_size,
                                             mask=pa.array(missing))


def add_rows(columns: dict[str, list], system: MoDESystem, ready: Classifier | None, experts: list[int],
             features: list[np.ndarray], readable: np.ndarray, top_k: int) -> None:
    """A batch's prediction columns: None where the image did not decode."""
    size = len(readable)
    if ready is not None:
        classes, scores = [None] * size, [None] * size
        if features:
            probs = system.scores(ready, features)
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            for row, at in zip(np.flatnonzero(readable), range(len(probs))):
                classes[row] = [ready.classnames[j] for j in order[at]]
                scores[row] = probs[at, order[at]].astype(np.float32).tolist()
        weights = ready.weights.astype(np.float32).tolist()
        columns.setdefault("classes", []).extend(classes)
        columns.setdefault("scores", []).extend(scores)
        columns.setdefault("routing_weights", []).extend([weights] * size)
        return
    dim = embedding_dim(system)
    for e, name in enumerate(system.expert_names):
        block = np.full((size, dim), np.nan, dtype=np.float32)
        if features:
            block[readable] = features[experts.index(e)]
        columns.setdefault(name, []).append(block)


def infer(system: MoDESystem, shards_spec: str, out: str | Path, request: InferRequest) -> dict:
    """Every shard of `shards_spec` not done yet; the summary (also written to OUT/infer.json)."""
    request.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, missing = select_shards(shards_spec, request.missing_shards)
    fp = fingerprint(system, request)
    ready = system.classifier(list(request.classes), list(request.templates) or None, request.top_experts) \
        if request.classes else None
    targets = [(shard, out / f"{shard_id(shard)}.parquet") for shard in shards]
    todo = [(shard, path) for shard, path in targets if not done(path, fp)]
    damage: dict[str, list[str]] = {}
    with tqdm(desc=f"infer {len(todo)}/{len(targets)} shards", unit="img", dynamic_ncols=True) as progress:
        for i, (shard, path) in enumerate(todo):
            if i + 1 < len(todo):
                fetch_ahead(todo[i + 1][0])  # a remote shard's transfer overlaps this one's work
            counts = infer_shard(system, ready, shard, path, fp, request, progress)
            if counts["damage"]:
                damage[str(shard)] = counts["damage"]
    summary = summarise(targets, fp, missing, ready, system, request, len(targets) - len(todo))
    atomic_write_json(out / SUMMARY, summary)
    return summary


def summarise(targets: list[tuple[object, Path]], fp: str, missing: list[str], ready: Classifier | None,
              system: MoDESystem, request: InferRequest, skipped: int) -> dict:
    """Counts over every output (read from the parquet footers, so a resumed run counts all)."""
    per_shard, damaged = {}, {}
    for shard, path in targets:
        meta = pq.read_metadata(path)
        predicted = pq.read_table(path, columns=["error"]).column("error").null_count  # no error: a prediction
        per_shard[path.name] = {"rows": meta.num_rows, "unreadable": meta.num_rows - predicted}
        notes = (meta.schema.to_arrow_schema().metadata or {}).get(b"moda_shard_damage")
        if notes:
            damaged[str(shard)] = notes.decode()
    out = {"fingerprint": fp, "system": str(system.spec.source), "mode": "classify" if ready else "embed",
           "shards": len(targets), "shards_skipped_as_done": skipped, "missing_shards": missing,
           "damaged_shards": damaged, "rows": sum(v["rows"] for v in per_shard.values()),
           "unreadable": sum(v["unreadable"] for v in per_shard.values()), "per_shard": per_shard,
           "top_k": request.top_k}
    if ready is not None:
        out["routing"] = {"rule": system.routing, "lambda": system.lam,
                          "weights": dict(zip(system.expert_names, map(float, ready.weights))),
                          "experts_run": [system.expert_names[e] for e in ready.experts]}
    return out
