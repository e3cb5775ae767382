"""A shard's captions, as the embed stage and SimCSE read them: usable ones, and rejects by reason."""

from __future__ import annotations

from pathlib import Path

from pipelines.shardio.shards import TRUNCATED, ShardError, iter_samples, read_caption


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
        rejects.append({"key": "", "shard": shard, "reason": f"{TRUNCATED}: {err}"})
    return keys, texts, rejects
