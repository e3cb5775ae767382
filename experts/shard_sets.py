"""An expert's shard set as the split writes it and the trainer reads it.

A folder of `{00000..}.tar` shards with `sizes.json` (shard name -> samples,
what open_clip_train reads instead of `--train-num-samples`) and a manifest
(samples, sizes, the sha256 of every shard, where the data came from). The
split stage writes one per expert; add-expert writes one for a new expert.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.core.config import TrainConfig
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


def check_shard_counts(cfg: TrainConfig, shard_sizes: dict[str, list[int]], processes: int) -> None:
    """What open_clip_train's data loaders need of each model's shards (`shard_sizes`: samples per
    shard, by model), `processes` being its world size, unless it samples with replacement:

    - a shard per data-loader worker and trainer process;
    - a full batch in what each loader is dealt: shards go round-robin to the loaders, which drop a
      last partial batch and, under webdataset's `with_epoch`, pass over their shards again until the
      epoch's batches are drawn, so a loader whose shards hold less than one batch never ends its
      epoch (seen: a 6-sample tail shard, two CPU nodes, batch 16, a loader spinning forever).
    """
    if cfg.dataset_resampled:
        return
    loaders = cfg.workers * max(1, processes)
    few = [name for name, sizes in shard_sizes.items() if len(sizes) < loaders]
    if few:
        raise ValueError(
            f"{few} have fewer shards than the {loaders} data loaders (train.workers x trainer processes) "
            "open_clip_train needs: raise split.min_shards, lower train.workers, or set "
            "train.dataset_resampled")
    short = {name: sum(sorted(sizes)[:len(sizes) // loaders]) for name, sizes in shard_sizes.items()}
    short = {name: least for name, least in short.items() if least < cfg.batch_size}
    if short:
        raise ValueError(
            f"{sorted(short)}: a data loader may be dealt only {min(short.values())} samples, less than one "
            f"batch of {cfg.batch_size} (train.batch_size), and would never end its epoch: set "
            "train.dataset_resampled, lower train.batch_size or train.workers, or raise split.shard_size")
