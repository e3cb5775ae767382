"""The split's plan: where every sample goes, worked out from the assignments alone.

Every assigned sample gets a *slot* in its expert's sequence (input shards in
order, samples in order), plus, with `ooc_ratio > 0`, slots in other experts
chosen by a hash of (key, expert) (MoDE's out-of-cluster mixing, experts/split/ooc.py).
Slot p of expert e goes to output shard p // shard_size_e. The plan is a
small table of slot offsets per (input shard, expert), so which output
shards an input shard feeds, and which input shard completes each output
shard, are known before any image is read; that is what lets a killed split
resume at the input shards that feed unfinished output shards.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from experts.split import ooc
from experts.split.duplicate_keys import BATCH_ROWS, duplicate_rows, earlier_shard_keys
from pipelines.core.config import SplitConfig
from pipelines.core.devices import usable_cores
from pipelines.shardio.sample_table import key_bytes


def shard_size_for(total: int, cfg: SplitConfig) -> int:
    """Samples per output shard of a shard set of `total` samples: `shard_size`, shrunk so that it
    has at least `min_shards` shards (open_clip_train needs one per data-loader worker and GPU)."""
    return max(1, min(cfg.shard_size, math.ceil(total / cfg.min_shards)))


def make_plan(assignments: Path, shard_order: list[str], num_experts: int, cfg: SplitConfig,
              workdir: Path | None = None) -> dict:
    """Slot offsets per (input shard, expert) and output shard sizes, from assignments alone.

    Streams the assignments in record batches; memory does not grow with the
    data: repeated keys are found by `duplicate_keys` in bounded memory, and
    only the rows that repeat a key are remembered.
    """
    parquet = pq.ParquetFile(assignments)
    own_counts = np.zeros(num_experts, dtype=np.int64)
    for batch in parquet.iter_batches(BATCH_ROWS, columns=["expert"]):
        own_counts += np.bincount(batch.column("expert").to_numpy(), minlength=num_experts)
    limits = ooc.thresholds(own_counts, cfg.ooc_ratio)
    repeats = duplicate_rows(assignments, shard_order, workdir)
    repeated_rows = np.array(sorted(repeats), dtype=np.int64)
    position = {s: i for i, s in enumerate(shard_order)}
    counts = np.zeros((len(shard_order), num_experts), dtype=np.int64)
    rows_per_shard = np.zeros(len(shard_order), dtype=np.int64)
    in_order, last = True, 0
    row = 0
    for batch in parquet.iter_batches(BATCH_ROWS, columns=["key", "shard", "expert"]):
        shards = np.fromiter((position[s] for s in batch.column("shard").to_pylist()), np.int64, batch.num_rows)
        if shards.size:
            in_order = in_order and shards[0] >= last and bool((np.diff(shards) >= 0).all())
            last = shards[-1]
        rows_per_shard += np.bincount(shards, minlength=len(shard_order))
        experts = batch.column("expert").to_numpy()
        keep = np.ones(batch.num_rows, dtype=bool)
        lo, hi = np.searchsorted(repeated_rows, [row, row + batch.num_rows])
        keep[repeated_rows[lo:hi] - row] = False
        np.add.at(counts, (shards[keep], experts[keep]), 1)
        if cfg.ooc_ratio > 0:
            keys = key_bytes(batch.column("key").to_pylist())[keep]
            copied, copied_to = np.nonzero(ooc.copies(keys, experts[keep], limits))
            np.add.at(counts, (shards[keep][copied], copied_to), 1)
        row += batch.num_rows
    totals = counts.sum(0)
    sizes = [shard_size_for(int(t), cfg) for t in totals]
    offsets = np.cumsum(counts, axis=0) - counts
    row_ends = np.cumsum(rows_per_shard)
    return {
        "assignment_rows": ({s: [int(row_ends[i] - rows_per_shard[i]), int(row_ends[i])]
                             for i, s in enumerate(shard_order)} if in_order else None),
        "offsets": {s: offsets[i].tolist() for i, s in enumerate(shard_order)},
        "counts": {s: counts[i].tolist() for i, s in enumerate(shard_order)},
        "totals": [int(t) for t in totals],
        "shard_sizes": sizes,
        "num_output_shards": [math.ceil(int(t) / sz) for t, sz in zip(totals, sizes)],
        "ooc_thresholds": limits.tolist(),
        "planned_duplicates": len(repeats),
        "earlier_shard_keys": earlier_shard_keys(repeats, shard_order),
    }


def output_shards_of(plan: dict, shard: str, expert: int) -> range:
    """Indices of expert's output shards that this input shard writes into."""
    start, count = plan["offsets"][shard][expert], plan["counts"][shard][expert]
    if count == 0:
        return range(0)
    size = plan["shard_sizes"][expert]
    return range(start // size, (start + count - 1) // size + 1)


def completing_shard(plan: dict, shard_order: list[str]) -> dict[tuple[int, int], str]:
    """(expert, output shard) -> the input shard after which it is complete."""
    done = {}
    for s in shard_order:
        for e in range(len(plan["totals"])):
            for k in output_shards_of(plan, s, e):
                done[(e, k)] = s  # later input shards overwrite: the last contributor wins
    return done


def input_runs(shards: list[Path], processes: int) -> list[list[Path]]:
    """Contiguous runs of input shards, one per split process (0 = one per two usable CPU cores).

    Why two cores a process: besides its parsing thread, a split process
    writes and hashes on three more threads and keeps about 1.6 cores busy
    (measured); one process per core on 2 cores ran 1.6x slower than one.
    """
    count = max(1, min(processes or usable_cores() // 2, len(shards)))
    bounds = np.linspace(0, len(shards), count + 1).round().astype(int)
    return [shards[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def boundary_shards(plan: dict, chunks: list[list[str]], num_experts: int) -> frozenset:
    """Output shards fed by input shards of more than one process: written as fragments, then joined."""
    writers: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, chunk in enumerate(chunks):
        for s in chunk:
            for e in range(num_experts):
                for k in output_shards_of(plan, s, e):
                    writers[(e, k)].add(w)
    return frozenset(ek for ek, ws in writers.items() if len(ws) > 1)
