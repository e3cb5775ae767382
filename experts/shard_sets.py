"""An expert's shard set as the split writes it and the trainer reads it.

A folder of `{00000..}.tar` shards with `sizes.json` (shard name -> samples,
what open_clip_train reads instead of `--train-num-samples`) and a manifest
(samples, sizes, the sha256 of every shard, where the data came from). The
split stage writes one per expert; add-expert writes one for a new expert.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.core.layout import MANIFEST, SIZES
from pipelines.core.manifest import atomic_write_json, file_sha256


def shard_set(folder: Path) -> tuple[list[Path], dict[str, int]]:
    """A shard set's shard files (in order) and its sizes.json content."""
    sizes = json.loads((folder / SIZES).read_text(encoding="utf-8"))
    return [folder / name for name in sorted(sizes)], sizes


def write_shard_set(folder: Path, sizes: dict[str, int], shard_hashes: dict[str, str], **about) -> None:
    """sizes.json, then the shard set's manifest (`about`: where its data came from, its shard size)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / SIZES, sizes)
    atomic_write_json(folder / MANIFEST, {"samples": sum(sizes.values()), "sizes": sizes,
                                          "shards_sha256": shard_hashes, **about})


def shard_set_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def shard_set_files(folder: Path) -> list[Path]:
    """The small files that describe a shard set (hashed into the stage's manifest)."""
    return [folder / SIZES, folder / MANIFEST]


def shard_set_fingerprint(folder: Path) -> str:
    """What identifies a shard set's data: the sha256 of its manifest (which lists every shard's)."""
    return file_sha256(folder / MANIFEST)
