"""Which rows of the cluster stage's assignments repeat a key, in bounded memory.

A key may appear more than once: twice in one shard (the split rejects the
later sample as it reads the shard) or in two shards (the same data listed
twice, a crawler's re-run). The first occurrence in the input order (shard
order, then row order) is kept; every later one is a `duplicate_key` reject.

A set of every key would cost ~100 bytes a sample (40 GB at LAION-400M), so
the rows are bucketed by a 64-bit hash of their key into partitions of at
most `PARTITION_ROWS` rows (`pipelines.shardio.spill`), each partition is sorted on its own, and only
rows whose hash repeats are read back to compare the keys themselves: exact, and memory stays bounded by
one partition plus the repeated rows.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq

from pipelines.shardio.spill import PARTITION_ROWS, HashSpill, key_hashes, partitions_for

BATCH_ROWS = 1 << 14  # assignments rows in memory at a time
SPILL_PREFIX = ".duplicate-keys-"  # a killed run's spill folder is recognised and removed by the split
_RECORD = np.dtype([("hash", "<u8"), ("shard", "<i8"), ("row", "<i8")])


class Repeat(NamedTuple):
    """A row that repeats an earlier key: the key, its shard and the first occurrence's shard
    (positions in the input order)."""

    key: str
    shard: int
    first_shard: int


def duplicate_rows(assignments: Path, shard_order: list[str], workdir: Path | None = None,
                   partition_rows: int = PARTITION_ROWS) -> dict[int, Repeat]:
    """Row number -> Repeat, for every row that repeats an earlier key (in input order).
    Rows of shards not in `shard_order` are an error."""
    position = {s: i for i, s in enumerate(shard_order)}
    parquet = pq.ParquetFile(assignments)
    partitions = partitions_for(parquet.metadata.num_rows, partition_rows)
    with tempfile.TemporaryDirectory(prefix=SPILL_PREFIX, dir=workdir) as tmp:
        with HashSpill(Path(tmp), "rows", _RECORD, partitions) as spill:
            row = 0
            for batch in parquet.iter_batches(BATCH_ROWS, columns=["key", "shard"]):
                keys = batch.column("key").to_pylist()
                records = np.empty(len(keys), dtype=_RECORD)
                records["hash"] = key_hashes(keys)
                records["shard"] = _positions(batch.column("shard").to_pylist(), position)
                records["row"] = np.arange(row, row + len(keys))
                row += len(keys)
                spill.add(records)
        repeated = [_repeated_hashes(spill.read(p)) for p in range(partitions)]
    candidates = np.concatenate(repeated) if repeated else np.empty(0, dtype=_RECORD)
    return _compare_keys(parquet, candidates)


def _positions(shards: list[str], position: dict[str, int]) -> np.ndarray:
    try:
        return np.fromiter((position[s] for s in shards), dtype=np.int64, count=len(shards))
    except KeyError as err:
        raise ValueError(f"assignments name shard {err.args[0]!r}, which is not among the input shards") from None


def _repeated_hashes(records: np.ndarray) -> np.ndarray:
    """The records whose hash occurs more than once, sorted by (hash, shard, row)."""
    records = records[np.lexsort((records["row"], records["shard"], records["hash"]))]
    h = records["hash"]
    repeat = np.zeros(len(h), dtype=bool)
    same = h[1:] == h[:-1]
    repeat[1:] |= same
    repeat[:-1] |= same
    return records[repeat]


def _compare_keys(parquet: pq.ParquetFile, candidates: np.ndarray) -> dict[int, Repeat]:
    """Among rows with a repeated hash, the ones whose key really occurred first in an earlier
    (shard, row): read back only those rows' keys, so a hash collision never drops a sample."""
    if not len(candidates):
        return {}
    wanted = np.sort(candidates["row"])
    keys: dict[int, str] = {}
    row = 0
    for batch in parquet.iter_batches(BATCH_ROWS, columns=["key"]):
        lo, hi = np.searchsorted(wanted, [row, row + batch.num_rows])
        if hi > lo:
            column = batch.column("key")
            for r in wanted[lo:hi].tolist():
                keys[r] = column[r - row].as_py()
        row += batch.num_rows
    out: dict[int, Repeat] = {}
    first_shard: dict[str, int] = {}
    group = None
    for h, shard, r in candidates.tolist():  # sorted by (hash, shard, row): earliest occurrence first
        if h != group:
            group, first_shard = h, {}
        key = keys[r]
        if key in first_shard:
            out[r] = Repeat(key, shard, first_shard[key])
        else:
            first_shard[key] = shard
    return out


def earlier_shard_keys(repeats: dict[int, Repeat], shard_order: list[str]) -> dict[str, list[str]]:
    """For the split: per shard, the keys first seen in an earlier shard (every sample of theirs is a
    duplicate there). Repeats within one shard are left to the split, which sees them in order."""
    earlier: dict[str, set[str]] = defaultdict(set)
    for repeat in repeats.values():
        if repeat.shard != repeat.first_shard:
            earlier[shard_order[repeat.shard]].add(repeat.key)
    return {shard: sorted(keys) for shard, keys in earlier.items()}
