"""`moda verify <run>`: check from the files alone that the split lost nothing.

Re-reads the input shards named in the split manifest and every expert
shard, and checks:
  - every expert shard holds as many samples as sizes.json says, with the
    sha256 its expert manifest records;
  - every key in an expert is either assigned to that expert by the cluster
    stage or one of its deterministic out-of-cluster copies;
  - input keys == own-expert keys + rejected keys, as multisets: no sample
    lost, none duplicated.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from experts.split import expert_dir_name, expert_shards, ooc_targets
from pipelines.manifest import file_sha256, require_manifest
from pipelines.shards import ShardError, iter_samples


def _keys(path: Path) -> tuple[list[str], bool]:
    keys, truncated = [], False
    try:
        for sample in iter_samples(path):
            keys.append(sample.key)
    except ShardError:
        truncated = True
    return keys, truncated


def verify_split(run_dir: str | Path) -> tuple[list[str], dict]:
    """(problems, summary); no problems means the split is exact."""
    run = Path(run_dir)
    split_dir, cluster_dir = run / "split", run / "cluster"
    manifest = require_manifest(split_dir, "split")
    plan = json.loads((split_dir / "plan.json").read_text())
    thresholds = np.array(plan["ooc_thresholds"])
    table = pq.read_table(cluster_dir / "assignments.parquet", columns=["key", "expert"])
    own_expert: dict[str, int] = {}
    for key, expert in zip(table.column("key").to_pylist(), table.column("expert").to_pylist()):
        own_expert.setdefault(key, expert)
    problems: list[str] = []

    inputs: Counter = Counter()
    for path in map(Path, manifest["input_shards"]):
        if not path.is_file():
            problems.append(f"input shard {path} is missing")
            continue
        keys, _ = _keys(path)
        inputs.update(keys)

    own: Counter = Counter()
    ooc = 0
    for e in range(manifest["num_experts"]):
        paths, sizes = expert_shards(split_dir, e)
        recorded = json.loads((split_dir / expert_dir_name(e) / "manifest.json").read_text())["shards_sha256"]
        for path in paths:
            keys, truncated = _keys(path)
            if truncated:
                problems.append(f"{path} is truncated")
            if len(keys) != sizes[path.name]:
                problems.append(f"{path}: {len(keys)} samples, sizes.json says {sizes[path.name]}")
            if file_sha256(path) != recorded.get(path.name):
                problems.append(f"{path}: sha256 differs from {expert_dir_name(e)}/manifest.json")
            for key in keys:
                if key not in own_expert:
                    problems.append(f"{path}: key {key!r} was never assigned by the cluster stage")
                elif own_expert[key] == e:
                    own[key] += 1
                elif e in ooc_targets(key, own_expert[key], thresholds):
                    ooc += 1
                else:
                    problems.append(f"{path}: key {key!r} belongs to expert {own_expert[key]}, not {e}")

    rejects = pq.read_table(split_dir / "rejects.parquet").to_pylist()
    rejected = Counter(r["key"] for r in rejects if r["key"])
    for key, n in own.items():
        if n > 1:
            problems.append(f"key {key!r} is written {n} times to its expert")
    accounted = own + rejected
    lost = inputs - accounted
    extra = accounted - inputs
    if lost:
        problems.append(f"{sum(lost.values())} input samples are neither in an expert nor rejected, "
                        f"e.g. {sorted(lost)[:5]}")
    if extra:
        problems.append(f"{sum(extra.values())} samples are accounted for more often than they occur in "
                        f"the input, e.g. {sorted(extra)[:5]}")
    summary = {"samples_in": sum(inputs.values()), "in_experts": sum(own.values()),
               "rejected": sum(rejected.values()), "ooc_copies": ooc,
               "truncated_inputs": sum(1 for r in rejects if not r["key"])}
    return problems, summary
