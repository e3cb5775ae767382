"""A shard's captions, as the embed stage and SimCSE read them: usable ones, and rejects by reason."""

from __future__ import annotations

from pathlib import Path

from pipelines.core.layout import shard_id
from pipelines.shardio.shards import ShardError, iter_samples, read_caption, shard_notes


def shard_captions(shard_path: Path) -> tuple[list[str], list[str], list[dict]]:
    """(keys, captions, rejects) of one shard: a sample without a usable caption is a reject; a
    skipped file (`._*`, a directory) or the shard's damage is a keyless row."""
    keys, texts, rejects, skipped = [], [], [], []
    shard = shard_id(shard_path)
    try:
        for sample in iter_samples(shard_path, skipped=skipped):
            text, reason = read_caption(sample)
            if reason:
                rejects.append({"key": sample.key, "shard": shard, "reason": reason})
            else:
                keys.append(sample.key)
                texts.append(text)
    except ShardError as err:
        rejects.append(err.row(shard))
    return keys, texts, rejects + shard_notes(shard, skipped)
