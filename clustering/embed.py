"""Stage 1, embed: one L2-normalised caption embedding per training sample.

Output, per input shard: `<shard>.parquet` (key, shard, caption, embedding;
clustering/embeddings.py) and a `<shard>.done.json` marker. Shards are
encoded in fixed groups of GROUP_SHARDS, and a killed run redoes only the
groups with an unfinished shard, so its files equal an uninterrupted run's.
Samples without a usable caption are counted by reason and listed in
`rejects.parquet`; none disappears: samples_in = embedded + rejected.

With `simcse_steps`, the encoder is first adapted to the captions
(clustering/simcse.py) and saved as `encoder/`, which embeds every caption
here and, through this stage's manifest, the class names later.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from clustering.captions import shard_captions
from clustering.embeddings import embedding_dim, embedding_table
from clustering.encoder import encode, load_encoder, model_fingerprint
from clustering.simcse import adapt_encoder
from pipelines.core.config import EmbedConfig, section_hash
from pipelines.core.devices import cpu_threads, cuda_index, is_cuda, job_cores, pick_device, usable_cores
from pipelines.core.jobs import Call, Pool, deal, run_jobs, run_local
from pipelines.core.layout import RunLayout, shard_id
from pipelines.core.manifest import (
    atomic_path,
    atomic_write_json,
    combine,
    hash_outputs,
    input_stats,
    read_manifest,
    source_hashes,
)
from pipelines.core.stage import Fingerprint, Stage, StageContext, StageResult
from pipelines.shardio.shards import count_reasons, select_shards, write_rejects


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


def shard_is_done(layout: RunLayout, shard_path: Path, config_hash: str, source_hash: str) -> dict | None:
    """The shard's completion marker when its output exists under this config and input."""
    marker = layout.embed_marker(shard_id(shard_path))
    if marker.is_file() and layout.embeddings(shard_id(shard_path)).is_file():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("config") == config_hash and info.get("source_sha256") == source_hash:
            return info
    return None


_ENCODERS: dict = {}  # a Dask worker's encoder, by (config hash, model, pooling, device)


def embed_shards(cfg: EmbedConfig, groups: list[list[Path]], source_hashes: dict[str, str], config_hash: str,
                 layout: RunLayout, device: str, threads: int = 0, position: int = 0,
                 encoder_path: str | None = None, keep_encoder: bool = False) -> None:
    """One worker's share: embed each group of shards in one call, write each shard's file then its marker.

    Runs in the stage's process, or in one spawned process per GPU (each with
    its own `device`) over a disjoint list of groups, or as a job on a Dask
    worker. `threads`: torch's CPU threads (0: on a CPU, the job's share where
    it runs, `job_cores()`; on a GPU, as inherited).
    """
    if threads or device == "cpu":
        import torch

        torch.set_num_threads(threads or job_cores())
    model = (encoder_path, "model") if encoder_path else (cfg.model, cfg.pooling)
    key = (config_hash, *model, device)  # the config hash names an adapted encoder's settings too
    encoder = _ENCODERS.get(key)
    if encoder is None:
        _ENCODERS.clear()
        encoder = load_encoder(*model, device, cfg.precision)
        if keep_encoder:  # a Dask worker runs several of the stage's jobs: load it once
            _ENCODERS[key] = encoder
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
                table = embedding_table(keys, shard_id(path), texts, vectors[offset:offset + len(texts)], cfg.storage)
                offset += len(texts)
                write_shard_output(layout, shard_id(path), table, {
                    "config": config_hash, "source_sha256": source_hashes[shard_id(path)], "embedded": table.num_rows,
                    "rejects": rejects, "seconds": seconds, "device": device,
                })
            bar.update(len(read))


def write_shard_output(layout: RunLayout, stem: str, table: pa.Table, marker: dict) -> None:
    """The shard's parquet file, then its completion marker (both atomic, in that order)."""
    with atomic_path(layout.embeddings(stem)) as tmp:
        pq.write_table(table, tmp)
    atomic_write_json(layout.embed_marker(stem), marker)


def worker_devices(cfg: EmbedConfig) -> list[str]:
    """One device per embed worker: every visible GPU (or `processes` of them), else the CPU."""
    device = pick_device(cfg.device)
    if cuda_index(device) is not None:  # one named GPU: one process on it
        return [device]
    if is_cuda(device):
        import torch

        count = torch.cuda.device_count()
        count = min(count, cfg.processes) if cfg.processes else count
        return [f"cuda:{i}" for i in range(max(1, count))]
    return [device] * max(1, cfg.processes)


def run_workers(cfg: EmbedConfig, encoder_path: str | None, todo: list[list[Path]], source_hashes: dict[str, str],
                config_hash: str, layout: RunLayout, pool: Pool | None = None) -> None:
    """Embed the groups `todo`: on this host in this process, or in one spawned process per device over
    disjoint groups; or as jobs of the hooks' pool (four per worker, so a slow worker holds up little).

    A group's embeddings depend on its captions only (each group is one
    encode() call), so how groups are dealt to workers changes no byte."""
    if pool is not None:
        gpu = is_cuda(pick_device(cfg.device))
        jobs = [Call(embed_shards, (cfg, groups, {shard_id(p): source_hashes[shard_id(p)] for g in groups for p in g},
                                    config_hash, layout, "cuda" if gpu else "cpu"),
                     {"encoder_path": encoder_path, "keep_encoder": True}, name=f"embed-{i}")
                for i, groups in enumerate(deal(todo, 4 * pool.workers))]
        run_jobs(pool, jobs, gpu=gpu)
        return
    devices = worker_devices(cfg)[:max(1, len(todo))]
    if len(devices) == 1:
        # On a CPU the thread count is set, not inherited: float sums depend on it, and a parent
        # that ran Dask's local cluster leaves OMP_NUM_THREADS=1 behind (embeddings then differ
        # in their last bits from a run started afresh).
        threads = cpu_threads() if devices[0] == "cpu" else 0
        embed_shards(cfg, todo, source_hashes, config_hash, layout, devices[0], threads, encoder_path=encoder_path)
        return
    threads = 0 if devices[0].startswith("cuda") else max(1, usable_cores() // len(devices))
    run_local([Call(embed_shards, (cfg, todo[w::len(devices)], source_hashes, config_hash, layout, device, threads, w,
                                   encoder_path)) for w, device in enumerate(devices)])


def fingerprint(ctx: StageContext) -> Fingerprint:
    """The config's result-changing fields, the encoder's identity, and the sha256 of every input shard.

    Input hashes recorded by the stage's last manifest are reused while the
    shards keep their size and modification time.
    """
    cfg: EmbedConfig = ctx.section
    shards, missing = select_shards(ctx.data.train_shards, ctx.data.missing_shards)
    hashes = source_hashes(shards, read_manifest(ctx.layout.embed))
    config_hash = combine(section_hash(cfg), model_fingerprint(cfg.model))
    return Fingerprint(combine("embed", config_hash, hashes), config_hash, hashes,
                       {"shards": shards, "missing": missing})


def work(ctx: StageContext, fp: Fingerprint) -> StageResult:
    """Embed every input shard, resuming at the groups not done under this config."""
    cfg: EmbedConfig = ctx.section
    layout, shards, hashes = ctx.layout, fp.details["shards"], fp.inputs
    stems = [shard_id(p) for p in shards]
    if len(set(stems)) != len(stems):
        raise ValueError("input shards must have distinct file names (their stems name the outputs)")
    encoder_path = None
    if cfg.simcse_steps:
        encoder_path = str(adapt_encoder(cfg, shards, layout.encoder, layout.encoder_marker, fp.config_hash))
    groups = [shards[i:i + GROUP_SHARDS] for i in range(0, len(shards), GROUP_SHARDS)]
    todo_groups = [g for g in groups
                   if not all(shard_is_done(layout, p, fp.config_hash, hashes[shard_id(p)]) for p in g)]
    todo = {p for g in todo_groups for p in g}
    t_embed = time.time()
    if todo:
        run_workers(cfg, encoder_path, todo_groups, hashes, fp.config_hash, layout, ctx.hooks.pool)
    embed_seconds = time.time() - t_embed
    markers = []
    for p in shards:
        info = shard_is_done(layout, p, fp.config_hash, hashes[shard_id(p)])
        if info is None:
            raise RuntimeError(f"{p}: embedding finished without its output; rerun the embed stage")
        markers.append(info)
    rejects = [r for info in markers for r in info["rejects"]]
    write_rejects(layout.embed_rejects, rejects)
    embedded = sum(info["embedded"] for info in markers)
    by_reason, rejected = count_reasons(rejects)
    done_now = sum(info["embedded"] for p, info in zip(shards, markers) if p in todo)
    outputs = [layout.embeddings(s) for s in stems] + [layout.embed_rejects]
    if encoder_path:
        outputs += sorted(f for f in Path(encoder_path).rglob("*") if f.is_file())
    return StageResult(
        outputs=hash_outputs(layout.embed, outputs),
        counts={
            "samples_in": embedded + rejected,
            "embedded": embedded, "rejected": by_reason,
            "shards_missing": len(fp.details["missing"]),
            # wall clock over the shards embedded by this run, all workers together
            "captions_per_second": round(done_now / embed_seconds, 1) if todo and embed_seconds else None,
        },
        extra={"input_stats": input_stats(shards), "shards": stems, "missing_shards": fp.details["missing"],
               "model": cfg.model, "pooling": cfg.pooling, "precision": cfg.precision,
               "dim": embedding_dim(layout.embeddings(stems[0])) if stems else 0,
               "encoder": layout.encoder.name if encoder_path else None},
    )


STAGE = Stage(name="embed", section="embed", reads=(), fingerprint=fingerprint, work=work, on_cluster=True)
