"""A new expert's shard set cut from the existing experts' shards: the samples of some fine clusters.

Used by add-expert (`split-widest`, `task`): the samples of the chosen fine
clusters are read from the experts that own them (already validated by the
split stage) and written as one shard set, in the new expert's own run
folder. It is a split stage of that folder (same wrapper, same manifest), so a
rerun with the same request skips it.

Out-of-cluster copies in the source shards are skipped (each sample is read
from its own expert's shards), so nothing is written twice. Conservation:
selected = written + rejected by the split stage.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq

from experts.shard_sets import shard_set, write_shard_set
from experts.split.plan import shard_size_for
from pipelines.core.config import SplitConfig, section_hash
from pipelines.core.layout import RunLayout, expert_name
from pipelines.core.manifest import combine, hash_outputs, require_manifest
from pipelines.core.stage import Fingerprint, Stage, StageContext, StageResult
from pipelines.shardio.shards import ShardSetWriter, iter_samples


def subset_stage(source: RunLayout, fine_clusters: np.ndarray, request: str) -> Stage:
    """The split stage of an added expert's folder: the samples of `fine_clusters` in the run at
    `source`, as shard set expert_000. `request` is the add-expert request's fingerprint."""

    def fingerprint(ctx: StageContext) -> Fingerprint:
        split_fp = require_manifest(source.split, "split")["fingerprint"]
        value = combine("subset", request, split_fp, fine_clusters.tolist())
        return Fingerprint(value, section_hash(ctx.section), {"split": split_fp})

    def work(ctx: StageContext, fp: Fingerprint) -> StageResult:
        return write_subset(ctx.section, source, ctx.layout, fine_clusters)

    return Stage(name="subset of the run's experts", section="split", reads=(), fingerprint=fingerprint, work=work,
                 writes="split")


def write_subset(cfg: SplitConfig, source: RunLayout, target: RunLayout, fine_clusters: np.ndarray) -> StageResult:
    table = pq.read_table(source.assignments, columns=["key", "fine", "expert"])
    wanted = np.isin(table.column("fine").to_numpy(), fine_clusters)
    keys = np.array(table.column("key").to_pylist(), dtype=object)[wanted]
    owners = table.column("expert").to_numpy()[wanted]
    selected_by_expert = {int(e): set(keys[owners == e]) for e in np.unique(owners)}
    selected = int(wanted.sum())
    if not selected:
        raise ValueError("add-expert: the chosen fine clusters hold no samples")
    out = target.expert_shards(0)
    shutil.rmtree(out, ignore_errors=True)
    shard_size = shard_size_for(selected, cfg)
    writer = ShardSetWriter(out, shard_size)
    found: set[str] = set()
    for expert, wanted_keys in sorted(selected_by_expert.items()):
        for path in shard_set(source.expert_shards(expert))[0]:
            for sample in iter_samples(path):
                if sample.key in wanted_keys and sample.key not in found:
                    writer.write(sample.key, sample.files)
                    found.add(sample.key)
    sizes = writer.close()
    split_rejected = set(pq.read_table(source.split_rejects, columns=["key"]).column("key").to_pylist())
    missing = [k for keys_ in selected_by_expert.values() for k in keys_ if k not in found]
    lost = [k for k in missing if k not in split_rejected]
    if lost:
        raise RuntimeError(f"add-expert: {len(lost)} selected samples are in no expert shard and were not "
                           f"rejected by the split, e.g. {lost[:5]}: rerun the split stage (moda verify)")
    write_shard_set(out, sizes, dict(writer.hashes), expert=0,
                    source_experts=[expert_name(e) for e in sorted(selected_by_expert)],
                    fine_clusters=fine_clusters.tolist(), shard_size=shard_size)
    return StageResult(
        outputs=hash_outputs(target.split, sorted(out.iterdir())),
        counts={"selected": selected, "written": sum(sizes.values()), "rejected_by_split": len(missing),
                "experts": [sum(sizes.values())]},
        extra={"num_experts": 1},
    )
