"""The bundled synthetic image-caption set: small, deterministic, multi-domain.

Four domains with their own vocabularies (synth/domains.py: geometric shapes,
rendered glyphs, textures, procedural scenes), three caption styles each, and
a small share of wrong captions as on the web. That gives clustering real semantic structure and routing something to
route on, at a size that trains on two CPU cores.

Output (img2dataset layout):
    <out>/train/{00000..}.tar   <key>.jpg, <key>.txt, <key>.json
    <out>/train/{00000..}.parquet, {00000..}_stats.json (written last)
    <out>/eval/<task>/task.json + 00000.tar   held-out test tasks, no image a near-duplicate
                                              of a training image (synth/novelty.py)
    <out>/val/<task>/...                      the same tasks from other random streams: for
                                              choosing settings (lambda, learning rate), never
                                              the test tasks
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.core.config import SynthConfig
from pipelines.core.layout import SIZES, TASK_FILE
from pipelines.core.manifest import atomic_path, atomic_write_json
from pipelines.shardio.shards import ShardSetWriter, encode_json, jpeg_bytes
from pipelines.synth.domains import DOMAINS, TASK_DOMAIN, TASKS, Drawn
from pipelines.synth.novelty import Thumbnails

SYNTH_MARKER = "synth.json"  # written last: the data set is complete, and under which config
GENERATOR_VERSION = 5  # 2: every image its own colour cast and noise, no near-duplicate held out; 3: larger
                       # shapes, readable glyph and texture contrast; 4: no colour words for shapes and glyphs;
                       # 5: shapes mostly one a picture and larger, glyphs larger, bolder, less turned, 85% digits


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _draw_train(cfg: SynthConfig, i: int) -> Drawn:
    """Training sample i: its own seeded stream, so it can be drawn again, alone, identically."""
    names = list(DOMAINS)
    rng = _rng(cfg.seed, 0, i)
    return DOMAINS[names[int(rng.integers(len(names)))]](rng, cfg.image_size)


def _write_train_shards(cfg: SynthConfig, out_dir: Path, first_shard: int, last_shard: int,
                        progress: bool) -> tuple[dict[str, int], tuple[np.ndarray, np.ndarray]]:
    """Training shards `first_shard` to `last_shard - 1` (samples i of those shards, each drawn from its
    own stream), with their parquet and stats files; returns their sizes and their images'
    thumbnails, in sample order. A job of `generate_train`: it needs nothing from other shards."""
    lo, hi = first_shard * cfg.shard_size, min(cfg.num_train, last_shard * cfg.shard_size)
    writer = ShardSetWriter(out_dir, cfg.shard_size, start_index=first_shard)
    wrong_rng = _rng(cfg.seed, 1)
    wrong = wrong_rng.random(cfg.num_train) < cfg.wrong_caption_rate
    donors = wrong_rng.integers(cfg.num_train, size=cfg.num_train)
    mine = wrong[lo:hi]
    borrowed = {d: _draw_train(cfg, d).caption for d in sorted(set(donors[lo:hi][mine].tolist()))}
    seen = Thumbnails()
    rows: list[dict] = []

    def write_rows(shard: str) -> None:
        with atomic_path(out_dir / f"{shard}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        atomic_write_json(out_dir / f"{shard}_stats.json", {"count": len(rows), "successes": len(rows)})
        rows.clear()

    for i in tqdm(range(lo, hi), desc="synth train", unit="img", disable=not progress):
        sample = _draw_train(cfg, i)
        caption = borrowed[int(donors[i])] if wrong[i] else sample.caption
        seen.add(sample.image)
        key = f"{i:09d}"
        meta = {"key": key, "domain": sample.domain, "label": sample.label,
                "style": sample.style, "wrong_caption": bool(wrong[i]), "caption": caption}
        shard = f"{writer.index:05d}"
        if rows and rows[-1]["shard"] != shard:
            write_rows(rows[-1]["shard"])
        writer.write(key, {"jpg": jpeg_bytes(sample.image), "txt": caption.encode("utf-8"),
                           "json": encode_json(meta)})
        rows.append({**meta, "shard": shard})
    sizes = writer.close(write_sizes=False)
    if rows:
        write_rows(rows[-1]["shard"])
    return sizes, seen.arrays()


def generate_train(cfg: SynthConfig, out_dir: Path, processes: int = 1) -> tuple[dict[str, int], Thumbnails]:
    """Write the training shards; return shard sizes and the images' thumbnails.

    Every sample is drawn from its own seeded stream, so the shards are cut into `processes`
    contiguous runs written at once (spawned processes) and the output is byte-identical whatever
    their number: 200,000 pairs at 224 px drew on one core for minutes (bench/gpu's data).

    One sample is in memory at a time per process (plus the captions of the few samples whose
    caption another sample borrows as its wrong caption, drawn first, and a 448-byte thumbnail a
    sample, 90 MB at 200,000 pairs). Measured peak RSS of the whole `moda synth` on one process:
    189 MB at 20,000 pairs, 564 MB at 200,000 (bench/results/synth_scale_cpu_2026-12-02.md).
    """
    shards = -(-cfg.num_train // cfg.shard_size)
    processes = max(1, min(processes, shards))
    bounds = [round(k * shards / processes) for k in range(processes + 1)]
    runs = [(bounds[k], bounds[k + 1]) for k in range(processes)]
    if processes == 1:
        parts = [_write_train_shards(cfg, out_dir, *runs[0], True)]
    else:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_write_train_shards, cfg, out_dir, a, b, False): b - a for a, b in runs}
            with tqdm(total=shards, desc=f"synth train ({processes} processes)", unit="shard") as bar:
                for future in as_completed(futures):
                    bar.update(futures[future])
            parts = [future.result() for future in futures]  # in shard order
    sizes: dict[str, int] = {}
    seen = Thumbnails()
    for part_sizes, thumbnails in parts:
        sizes.update(part_sizes)
        seen.extend(*thumbnails)
    atomic_write_json(out_dir / SIZES, sizes)
    return sizes, seen


TRIES = 100


def _fresh(make, rng, size, label, seen: Thumbnails) -> Drawn:
    """Draw until the image is no near-duplicate of a training image or of one drawn for a task before."""
    for _ in range(TRIES):
        sample = make(rng, size, label)
        if seen.is_new(sample.image):
            seen.add(sample.image)
            return sample
    raise RuntimeError(f"could not draw a {label or 'retrieval'!r} image unlike every training image in "
                       f"{TRIES} tries: the domain repeats itself; widen its drawing (pipelines/synth/domains.py)")


@contextlib.contextmanager
def task_folder(final: Path):
    """A task folder written under a hidden temporary name and renamed into place when complete, so
    a failure or a kill leaves no half-written task (evaluate refuses a folder without task.json)."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_tasks(cfg: SynthConfig, out_dir: Path, seen: Thumbnails, per_class: int, stream: int) -> dict[str, int]:
    """One classification task per domain and one retrieval set, from random streams (`stream`,
    `stream + 1`) no training sample uses; every image new (no near-duplicate of one seen)."""
    counts = {}
    for t, (task, (classnames, templates)) in enumerate(TASKS.items()):
        make = DOMAINS[TASK_DOMAIN[task]]
        with task_folder(out_dir / task) as folder:
            writer = ShardSetWriter(folder, 10**9)
            for label_index, name in enumerate(classnames):
                for j in range(per_class):
                    sample = _fresh(make, _rng(cfg.seed, stream, t, label_index, j), cfg.image_size, name, seen)
                    writer.write(f"{task}_{label_index:03d}_{j:05d}",
                                 {"jpg": jpeg_bytes(sample.image), "cls": str(label_index).encode()})
            writer.close()
            atomic_write_json(folder / TASK_FILE, {"name": task, "kind": "classification",
                                                   "classnames": classnames, "templates": templates})
        counts[task] = len(classnames) * per_class
    names = list(DOMAINS)
    with task_folder(out_dir / "retrieval") as folder:
        writer = ShardSetWriter(folder, 10**9)
        for j in range(cfg.retrieval_pairs):
            make = DOMAINS[names[j % len(names)]]
            sample = _fresh(make, _rng(cfg.seed, stream + 1, j), cfg.image_size, None, seen)
            writer.write(f"retrieval_{j:05d}", {"jpg": jpeg_bytes(sample.image), "txt": sample.caption.encode()})
        writer.close()
        atomic_write_json(folder / TASK_FILE, {"name": "retrieval", "kind": "retrieval"})
    counts["retrieval"] = cfg.retrieval_pairs
    return counts


def synth_marker(cfg: SynthConfig) -> dict:
    """What the marker records: the config and the generator's version (new drawing code makes
    another data set from the same config)."""
    return {"config": dataclasses.asdict(cfg), "generator": GENERATOR_VERSION}


def is_generated(cfg: SynthConfig, out_dir: str | Path | None = None) -> bool:
    """Whether `out_dir` holds a complete set made from this config by this generator."""
    marker = Path(out_dir or cfg.out_dir) / SYNTH_MARKER
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text(encoding="utf-8"))
    return {k: recorded.get(k) for k in ("config", "generator")} == synth_marker(cfg)


def generate(cfg: SynthConfig, out_dir: str | Path | None = None, processes: int = 1) -> dict:
    """Generate the whole demo set under `out_dir` (default `cfg.out_dir`) with the training shards
    written by `processes` processes (the same bytes whatever their number); the marker is written
    last. The held-out tasks are drawn in one process: each image must be new against every one
    drawn before it."""
    root = Path(out_dir or cfg.out_dir)
    (root / SYNTH_MARKER).unlink(missing_ok=True)
    sizes, seen = generate_train(cfg, root / "train", processes)
    counts = generate_tasks(cfg, root / "eval", seen, cfg.eval_per_class, stream=2)
    summary = {"train_shards": sizes, "train_samples": sum(sizes.values()), "eval": counts}
    if cfg.val_per_class:
        summary["val"] = generate_tasks(cfg, root / "val", seen, cfg.val_per_class, stream=4)
    atomic_write_json(root / SYNTH_MARKER, {**synth_marker(cfg), **summary})
    return summary
