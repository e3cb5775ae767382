"""Stage 3, split: one WebDataset shard set per expert, readable by open_clip_train.

The MoDE reference code makes every expert stream every shard and filter at
read time; we materialise each expert's data once, so training reads only
its own shards. Each input shard is read once, each sample goes to the
expert the cluster stage assigned, and every sample that does not make it
(no usable caption, undecodable image, duplicate key, truncated tar) is
counted by reason and listed in rejects.parquet:

    samples_in = sum(expert sizes) + rejected

Odd but valid images (grayscale, RGBA, CMYK, PNG) are converted to RGB JPEG
rather than rejected. Outputs are written under a temporary folder and
renamed into place at the end, so a killed split leaves no partial expert.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pipelines.config import SplitConfig, section_hash
from pipelines.manifest import (
    atomic_path,
    atomic_write_json,
    combine,
    file_sha256,
    hash_outputs,
    is_done,
    read_manifest,
    require_manifest,
    write_manifest,
)
from pipelines.shards import ShardError, ShardSetWriter, iter_samples, jpeg_bytes

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
Image.MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are rejected as "huge_image", not decoded


def expert_dir_name(expert: int) -> str:
    return f"expert_{expert:03d}"


def clean_image(files: dict[str, bytes]) -> tuple[bytes | None, str | None]:
    """The sample's image as RGB JPEG bytes, or (None, reason) when unusable.

    A JPEG that is already RGB passes through byte for byte; anything else
    that decodes is converted.
    """
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return None, "missing_image"
    raw = files[ext]
    if not raw:
        return None, "empty_image"
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            if image.format == "JPEG" and image.mode == "RGB":
                return raw, None
            if image.mode == "I;16" or image.mode.startswith("I"):
                image = image.point(lambda v: v / 256).convert("L")
            return jpeg_bytes(image.convert("RGB")), None
    except Image.DecompressionBombError:
        return None, "huge_image"
    except Exception:  # PIL raises many types for damaged data
        return None, "corrupt_image"


def load_assignments(cluster_dir: Path) -> dict[str, int]:
    table = pq.read_table(cluster_dir / "assignments.parquet", columns=["key", "expert"])
    return dict(zip(table.column("key").to_pylist(), table.column("expert").to_pylist()))


def load_embed_rejects(embed_dir: Path) -> dict[str, str]:
    path = embed_dir / "rejects.parquet"
    if not path.is_file():
        return {}
    table = pq.read_table(path)
    return {k: r for k, r in zip(table.column("key").to_pylist(), table.column("reason").to_pylist()) if k}


def run_split(cfg: SplitConfig, shards: list[Path], embed_dir: Path, cluster_dir: Path,
              stage_dir: Path) -> dict:
    started = time.time()
    upstream = require_manifest(cluster_dir, "cluster")
    config_hash = section_hash(cfg)
    source_hashes = {p.stem: file_sha256(p) for p in shards}
    fingerprint = combine("split", config_hash, upstream["fingerprint"], source_hashes)
    if is_done(stage_dir, fingerprint):
        return {**read_manifest(stage_dir), "skipped": True}

    expert_of_key = load_assignments(cluster_dir)
    caption_rejects = load_embed_rejects(embed_dir)
    num_experts = upstream["num_experts"]
    partial = stage_dir / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    writers = [ShardSetWriter(partial / expert_dir_name(e), cfg.shard_size) for e in range(num_experts)]
    sources: list[set[str]] = [set() for _ in range(num_experts)]
    seen: set[str] = set()
    rejects: list[dict] = []
    samples_in = 0
    for shard_path in tqdm(shards, desc="split", unit="shard"):
        shard = shard_path.stem
        try:
            for sample in iter_samples(shard_path):
                samples_in += 1
                reason = None
                if sample.key in seen:
                    reason = "duplicate_key"
                elif sample.key not in expert_of_key:
                    reason = "caption:" + caption_rejects.get(sample.key, "not_embedded")
                image = None
                if reason is None:
                    image, reason = clean_image(sample.files)
                if reason is not None:
                    rejects.append({"key": sample.key, "shard": shard, "reason": reason})
                    continue
                seen.add(sample.key)
                expert = expert_of_key[sample.key]
                files = {"jpg": image, "txt": sample.files["txt"]}
                if "json" in sample.files:
                    files["json"] = sample.files["json"]
                writers[expert].write(sample.key, files)
                sources[expert].add(shard)
        except ShardError as err:
            rejects.append({"key": "", "shard": shard, "reason": f"truncated_tar: {err}"})

    expert_counts = []
    for e, writer in enumerate(writers):
        sizes = writer.close()
        expert_counts.append(sum(sizes.values()))
        atomic_write_json(writer.out_dir / "manifest.json", {
            "expert": e, "samples": sum(sizes.values()), "sizes": sizes,
            "shards_sha256": {p.name: file_sha256(p) for p in writer.shard_paths},
            "source_shards": sorted(sources[e]),
        })
    for e in range(num_experts):
        final = stage_dir / expert_dir_name(e)
        shutil.rmtree(final, ignore_errors=True)
        (partial / expert_dir_name(e)).rename(final)
    shutil.rmtree(partial, ignore_errors=True)
    with atomic_path(stage_dir / "rejects.parquet") as tmp:
        schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string())])
        pq.write_table(pa.Table.from_pylist(rejects, schema=schema), tmp)

    by_reason = Counter(r["reason"].split(":")[0] if r["reason"].startswith("truncated") else r["reason"]
                        for r in rejects)
    rejected = sum(n for r, n in by_reason.items() if r != "truncated_tar")
    if samples_in != sum(expert_counts) + rejected:
        raise RuntimeError(f"split lost samples: {samples_in} in, {sum(expert_counts)} out, {rejected} rejected")
    outputs = [p for e in range(num_experts) for p in (stage_dir / expert_dir_name(e)).iterdir()]
    outputs.append(stage_dir / "rejects.parquet")
    return write_manifest(
        stage_dir, stage="split", fingerprint=fingerprint, config_hash=config_hash,
        inputs={"cluster": upstream["fingerprint"], **source_hashes},
        outputs=hash_outputs(stage_dir, outputs),
        counts={"samples_in": samples_in, "experts": expert_counts, "rejected": dict(by_reason)},
        started=started, extra={"num_experts": num_experts},
    )


def expert_shards(split_dir: Path, expert: int) -> tuple[list[Path], dict[str, int]]:
    """An expert's shard files and sizes.json content."""
    folder = split_dir / expert_dir_name(expert)
    sizes = json.loads((folder / "sizes.json").read_text())
    return [folder / name for name in sorted(sizes)], sizes
