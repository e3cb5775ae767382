"""The bundled synthetic image-caption set: small, deterministic, multi-domain.

Four domains with their own vocabularies (synth/domains.py: geometric shapes,
rendered glyphs, textures, procedural scenes), three caption styles each, and
a small share of wrong captions as on the web. That gives clustering real semantic structure and routing something to
route on, at a size that trains on two CPU cores.

Output (img2dataset layout):
    <out>/train/{00000..}.tar   <key>.jpg, <key>.txt, <key>.json
    <out>/train/{00000..}.parquet, {00000..}_stats.json (written last)
    <out>/eval/<task>/task.json + 00000.tar   held-out tasks, never seen in training
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipelines.core.config import SynthConfig
from pipelines.core.layout import TASK_FILE
from pipelines.core.manifest import atomic_path, atomic_write_json
from pipelines.shardio.shards import ShardSetWriter, encode_json, jpeg_bytes
from pipelines.synth.domains import DOMAINS, TASK_DOMAIN, TASKS, Drawn

SYNTH_MARKER = "synth.json"  # written last: the data set is complete, and under which config


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _draw_train(cfg: SynthConfig, i: int) -> Drawn:
    """Training sample i: its own seeded stream, so it can be drawn again, alone, identically."""
    names = list(DOMAINS)
    rng = _rng(cfg.seed, 0, i)
    return DOMAINS[names[int(rng.integers(len(names)))]](rng, cfg.image_size)


def generate_train(cfg: SynthConfig, out_dir: Path) -> tuple[dict[str, int], set[str]]:
    """Write the training shards; return shard sizes and the image hashes.

    One sample is in memory at a time (plus the captions of the few samples
    whose caption another sample borrows as its wrong caption, drawn first),
    so the size of the synthetic set is bounded by disk, not memory.
    """
    writer = ShardSetWriter(out_dir, cfg.shard_size)
    wrong_rng = _rng(cfg.seed, 1)
    wrong = wrong_rng.random(cfg.num_train) < cfg.wrong_caption_rate
    donors = wrong_rng.integers(cfg.num_train, size=cfg.num_train)
    borrowed = {d: _draw_train(cfg, d).caption for d in sorted(set(donors[wrong].tolist()))}
    hashes: set[str] = set()
    rows: list[dict] = []

    def write_rows(shard: str) -> None:
        with atomic_path(out_dir / f"{shard}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        atomic_write_json(out_dir / f"{shard}_stats.json", {"count": len(rows), "successes": len(rows)})
        rows.clear()

    for i in tqdm(range(cfg.num_train), desc="synth train", unit="img"):
        sample = _draw_train(cfg, i)
        caption = borrowed[int(donors[i])] if wrong[i] else sample.caption
        image = jpeg_bytes(sample.image)
        hashes.add(hashlib.sha1(image).hexdigest())
        key = f"{i:09d}"
        meta = {"key": key, "domain": sample.domain, "label": sample.label,
                "style": sample.style, "wrong_caption": bool(wrong[i]), "caption": caption}
        shard = f"{writer.index:05d}"
        if rows and rows[-1]["shard"] != shard:
            write_rows(rows[-1]["shard"])
        writer.write(key, {"jpg": image, "txt": caption.encode("utf-8"), "json": encode_json(meta)})
        rows.append({**meta, "shard": shard})
    sizes = writer.close()
    if rows:
        write_rows(rows[-1]["shard"])
    return sizes, hashes


def _fresh(make, rng, size, label, seen: set[str]) -> tuple[Drawn, bytes]:
    """Draw until the image was never seen in training (held-out means disjoint)."""
    for _ in range(100):
        sample = make(rng, size, label)
        image = jpeg_bytes(sample.image)
        digest = hashlib.sha1(image).hexdigest()
        if digest not in seen:
            seen.add(digest)
            return sample, image
    raise RuntimeError(f"could not draw an unseen {label!r} image in 100 tries")


def generate_eval(cfg: SynthConfig, out_dir: Path, seen: set[str]) -> dict[str, int]:
    """Write one classification task per domain and one retrieval set."""
    counts = {}
    for t, (task, (classnames, templates)) in enumerate(TASKS.items()):
        make = DOMAINS[TASK_DOMAIN[task]]
        task_dir = out_dir / task
        writer = ShardSetWriter(task_dir, 10**9)
        n = 0
        for label_index, name in enumerate(classnames):
            for j in range(cfg.eval_per_class):
                rng = _rng(cfg.seed, 2, t, label_index, j)
                _, image = _fresh(make, rng, cfg.image_size, name, seen)
                writer.write(f"{task}_{label_index:03d}_{j:05d}",
                             {"jpg": image, "cls": str(label_index).encode()})
                n += 1
        writer.close()
        atomic_write_json(task_dir / TASK_FILE, {
            "name": task, "kind": "classification",
            "classnames": classnames, "templates": templates,
        })
        counts[task] = n
    writer = ShardSetWriter(out_dir / "retrieval", 10**9)
    names = list(DOMAINS)
    for j in range(cfg.retrieval_pairs):
        rng = _rng(cfg.seed, 3, j)
        make = DOMAINS[names[j % len(names)]]
        sample, image = _fresh(make, rng, cfg.image_size, None, seen)
        writer.write(f"retrieval_{j:05d}", {"jpg": image, "txt": sample.caption.encode()})
    writer.close()
    atomic_write_json(out_dir / "retrieval" / TASK_FILE, {"name": "retrieval", "kind": "retrieval"})
    counts["retrieval"] = cfg.retrieval_pairs
    return counts


def generate(cfg: SynthConfig, out_dir: str | Path | None = None) -> dict:
    """Generate the whole demo set under `out_dir` (default `cfg.out_dir`)."""
    root = Path(out_dir or cfg.out_dir)
    sizes, hashes = generate_train(cfg, root / "train")
    counts = generate_eval(cfg, root / "eval", set(hashes))
    summary = {"train_shards": sizes, "train_samples": sum(sizes.values()), "eval": counts}
    atomic_write_json(root / SYNTH_MARKER, {"config": cfg.__dict__, **summary})
    return summary
