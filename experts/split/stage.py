"""Stage 3, split: one WebDataset shard set per expert, readable by open_clip_train.

The MoDE reference code makes every expert stream every shard and filter at
read time; we materialise each expert's data once, exactly.

How it stays exact and restartable with constant memory:

1. Plan (split/plan.py, from the cluster stage's assignments; no image is
   read): every assigned sample gets a slot in its expert's sequence, so each
   input shard knows which output shards it feeds and each output shard which
   input shard completes it.
2. Stream (split/shard.py): each input shard is read once (memory-mapped);
   each valid sample is written to its slots, as the very bytes it has in the
   input tar when its files need no change. An output shard is closed and
   renamed into place as soon as the input shard that completes it is done
   (split/outputs.py), and a per-input-shard progress file records its counts
   and rejects.
3. Resume: a rerun after a kill keeps every output shard already renamed into
   place, skips every input shard whose progress file exists and whose output
   shards are all final, and rewrites only the unfinished output shards. The
   result is byte-identical to an uninterrupted run, whatever the number of
   split processes (`split.processes`, contiguous runs of input shards; an
   output shard fed by two processes is written as fragments and joined).

Rejected samples (no usable caption, undecodable or huge image, no image,
duplicate key, truncated tar) leave their slot empty and are counted by
reason and listed in rejects.parquet:   samples_in = sum(expert sizes) + rejected
(out-of-cluster copies are counted separately). Odd but valid images
(grayscale, RGBA, CMYK, 16-bit, PNG) are converted to RGB JPEG.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from experts.shard_sets import shard_set_files, shard_set_manifest, write_shard_set
from experts.split import ooc
from experts.split.duplicate_keys import SPILL_PREFIX
from experts.split.outputs import OutputShards
from experts.split.plan import boundary_shards, completing_shard, input_runs, make_plan, output_shards_of
from experts.split.rows import AssignmentRows
from experts.split.shard import PREFETCH_SHARDS, prefetch, split_input_shard
from pipelines.core.config import SplitConfig, section_hash
from pipelines.core.devices import job_cores, usable_cores
from pipelines.core.jobs import Call, run_jobs
from pipelines.core.layout import RunLayout, expert_name, shard_id, shard_name
from pipelines.core.manifest import atomic_write_json, combine, hash_outputs, input_stats, read_manifest, source_hashes
from pipelines.core.shard_url import is_remote
from pipelines.core.stage import Fingerprint, Stage, StageContext, StageResult
from pipelines.shardio.shards import count_reasons, select_shards, write_rejects


def split_shards(chunk: list[Path], *, worker: int, plan: dict, order: list[str], layout: RunLayout,
                 caption_rejects: dict[str, str], cfg: SplitConfig, boundary: frozenset,
                 num_experts: int, threads: int = 1) -> dict[str, int]:
    """One process's run of input shards, in order: write, finalize what completes, record progress.

    `threads`: its share of the cores for decoding the images that must be decoded (0: the job's
    share where it runs, `job_cores()`: on a Dask worker, its cores over the jobs it runs at once).

    Returns the sample counts of its fragments of boundary shards ("e_k" -> count).
    """
    threads = threads or job_cores()
    outputs = OutputShards(layout, boundary, worker)
    closes_after: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for ek, s in completing_shard(plan, order).items():
        if ek not in boundary:
            closes_after[s].append(ek)
    rows = AssignmentRows(layout.assignments, plan.get("assignment_rows"))
    # What a resumed run skips is settled before any shard is read ahead: a shard read ahead and
    # then skipped cost a transfer for nothing (and, remote, a temporary copy held until exit).
    todo = [path for path in chunk if not _is_done(path, plan, layout, outputs, num_experts)]
    progress = tqdm(total=len(chunk), initial=len(chunk) - len(todo), desc=f"split {worker}", unit="shard",
                    position=worker)
    for i, shard_path in enumerate(todo):
        # the first shards at once, then one more a step: PREFETCH_SHARDS ahead of the one split
        for ahead in todo[0 if i == 0 else i + PREFETCH_SHARDS:i + 1 + PREFETCH_SHARDS]:
            prefetch(ahead)
        s = shard_id(shard_path)
        result = split_input_shard(shard_path, plan, rows, caption_rejects, outputs, cfg, threads)
        outputs.hand_over()  # the queued samples are views of this shard's map: let it go
        for e, k in sorted(closes_after.get(s, [])):
            if not outputs.is_final(e, k):
                outputs.finalize(e, k)
        # Once its samples are written. A rerun skips the shard only if every output shard it feeds
        # is also recorded as in place, so this record may land before the ones it completed.
        outputs.after(atomic_write_json, layout.input_record(s), result)
        progress.update()
    progress.close()
    fragments = outputs.close_fragments()
    outputs.wait()
    return fragments


def _is_done(shard_path, plan: dict, layout: RunLayout, outputs: OutputShards, num_experts: int) -> bool:
    """An input shard a rerun skips: its progress record is written and every output shard it feeds
    is in place."""
    s = shard_id(shard_path)
    touched = [(e, k) for e in range(num_experts) for k in output_shards_of(plan, s, e)]
    return layout.input_record(s).is_file() and all(outputs.is_final(e, k) for e, k in touched)


def load_embed_rejects(layout: RunLayout) -> dict[str, str]:
    """Key -> reason of every sample the embed stage rejected (its caption), to name why the split
    has no assignment for it."""
    if not layout.embed_rejects.is_file():
        return {}
    table = pq.read_table(layout.embed_rejects)
    return {k: r for k, r in zip(table.column("key").to_pylist(), table.column("reason").to_pylist()) if k}


def split_config_hash(cfg: SplitConfig) -> str:
    """The config's result-changing fields, with the out-of-cluster hash's name when copies are made
    (a plan made with another hash would not fit)."""
    config = section_hash(cfg)
    return combine(config, ooc.HASH) if cfg.ooc_ratio > 0 else config


def fingerprint(ctx: StageContext) -> Fingerprint:
    """Config, the cluster stage's fingerprint, the input shards' sha256.

    The shards' hashes the embed stage (or this stage's last run) recorded are
    reused while the files keep their size and modification time.
    """
    shards, missing = select_shards(ctx.data.train_shards, ctx.data.missing_shards)
    hashes = source_hashes(shards, ctx.upstream["embed"], read_manifest(ctx.layout.split))
    check_inputs_unchanged(hashes, ctx.upstream["embed"], shards)
    config_hash = split_config_hash(ctx.section)
    cluster_fp = ctx.upstream["cluster"]["fingerprint"]
    return Fingerprint(combine("split", config_hash, cluster_fp, hashes), config_hash,
                       {"cluster": cluster_fp, **hashes}, {"shards": shards, "missing": missing})


class InputChanged(ValueError):
    """An input shard differs from the one the embed stage read: its clustered samples would vanish."""


def check_inputs_unchanged(hashes: dict[str, str], embed: dict, shards: list[Path]) -> None:
    """Refuse to split shards that are not the ones embedded (replaced, rewritten, added, removed
    since the embed stage ran): the assignments describe the old ones."""
    embedded = embed.get("inputs", {})
    by_id = {shard_id(p): p for p in shards}
    changed = [i for i, digest in hashes.items() if i in embedded and embedded[i] != digest]
    added = [i for i in hashes if i not in embedded]
    removed = [i for i in embedded if i not in hashes]
    if not (changed or added or removed):
        return
    first = changed or added or removed
    what = ("changed since the embed stage read it (sha256 " + embedded[first[0]][:12] + " then, "
            + hashes[first[0]][:12] + " now)" if changed else
            "was not there when the embed stage ran" if added else "was embedded but is no longer listed")
    name = by_id.get(first[0], first[0])
    raise InputChanged(f"input shard {name} {what}; {len(changed)} changed, {len(added)} new, {len(removed)} "
                       "missing in all. Rerun from the embed stage (`moda run <config>`, or `--stages "
                       "embed,cluster,split,...`), or restore the shards the run embedded.")


def _start_or_resume(layout: RunLayout, fp: Fingerprint, num_experts: int, order: list[str],
                     cfg: SplitConfig) -> dict:
    """The plan of this fingerprint: the one on disk (a killed run resumes), or a new one after
    clearing every output of another plan."""
    previous = json.loads(layout.split_plan.read_text()) if layout.split_plan.is_file() else None
    if previous is not None and previous.get("fingerprint") == fp.value:
        plan = previous
    else:
        for e in range(max(num_experts, previous.get("num_experts", 0) if previous else 0)):
            shutil.rmtree(layout.expert_shards(e), ignore_errors=True)
        shutil.rmtree(layout.input_records.parent, ignore_errors=True)
        layout.manifest("split").unlink(missing_ok=True)
        plan = make_plan(layout.assignments, order, num_experts, cfg, workdir=layout.split)
        atomic_write_json(layout.split_plan, {"fingerprint": fp.value, "num_experts": num_experts, **plan})
    for stale in [*layout.split.glob("expert_*/.*.tmp"), *layout.split.glob("expert_*/.*.part*")]:
        stale.unlink()  # what a killed run was writing (every unfinished shard is written anew)
    for stale in layout.split.glob(f"{SPILL_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed plan's spill files
    return plan


def work(ctx: StageContext, fp: Fingerprint) -> StageResult:
    cfg: SplitConfig = ctx.section
    layout, shards = ctx.layout, fp.details["shards"]
    num_experts = ctx.upstream["cluster"]["num_experts"]
    order = [shard_id(p) for p in shards]
    plan = _start_or_resume(layout, fp, num_experts, order, cfg)
    completes = completing_shard(plan, order)
    layout.input_records.mkdir(parents=True, exist_ok=True)
    pool = ctx.hooks.pool
    chunks = input_runs(shards, cfg.processes or (pool.workers if pool is not None else 0))
    boundary = boundary_shards(plan, [[shard_id(p) for p in chunk] for chunk in chunks], num_experts)
    job = dict(plan=plan, order=order, layout=layout, caption_rejects=load_embed_rejects(layout),
               cfg=cfg, boundary=boundary, num_experts=num_experts,
               threads=0 if pool is not None else max(1, usable_cores() // len(chunks)))
    fragments = run_jobs(pool, [Call(split_shards, (chunk,), {"worker": w, **job}, name=f"split-{w}")
                                for w, chunk in enumerate(chunks)])
    outputs = OutputShards(layout)
    for e, k in sorted(boundary):
        if not outputs.is_final(e, k):
            samples = sum(counts.get(f"{e}_{k}", 0) for counts in fragments)
            outputs.join(e, k, len(chunks), samples)
    for e, k in sorted(completes):  # experts with no samples at all still get their shards listed
        if not outputs.is_final(e, k):
            outputs.finalize(e, k)
    outputs.wait()
    return _finish(cfg, layout, shards, plan, num_experts, fp.details["missing"])


def _finish(cfg: SplitConfig, layout: RunLayout, shards: list[Path], plan: dict, num_experts: int,
            missing: list[str]) -> StageResult:
    """Per-expert shard-set files, rejects.parquet, the conservation check (absent shards counted)."""
    records = [json.loads(layout.input_record(shard_id(p)).read_text()) for p in shards]
    expert_counts = []
    for e in range(num_experts):
        sizes, hashes = {}, {}
        for k in range(plan["num_output_shards"][e]):
            out = json.loads(layout.output_record(e, k).read_text())
            sizes[shard_name(k)] = out["samples"]
            hashes[shard_name(k)] = out["sha256"]
        sources = sorted(shard_id(p) for p in shards if plan["counts"][shard_id(p)][e] > 0)
        write_shard_set(layout.expert_shards(e), sizes, hashes, expert=e, source_shards=sources,
                        shard_size=plan["shard_sizes"][e], ooc_ratio=cfg.ooc_ratio)
        expert_counts.append(sum(sizes.values()))
    rejects = [r for rec in records for r in rec["rejects"]]
    write_rejects(layout.split_rejects, rejects)
    by_reason, rejected = count_reasons(rejects)
    samples_in = sum(rec["samples_in"] for rec in records)
    own = sum(rec["own"] for rec in records)
    ooc_copies = sum(rec["ooc"] for rec in records)
    if samples_in != own + rejected or sum(expert_counts) != own + ooc_copies:
        raise RuntimeError(f"split does not add up: {samples_in} in, {own} written, {rejected} rejected, "
                           f"{ooc_copies} out-of-cluster copies, {sum(expert_counts)} in expert shards")
    # The shards were hashed while written (progress records); only the small files are read here.
    outputs = {f"{expert_name(e)}/{name}": digest for e in range(num_experts)
               for name, digest in shard_set_manifest(layout.expert_shards(e))["shards_sha256"].items()}
    small = [f for e in range(num_experts) for f in shard_set_files(layout.expert_shards(e))]
    outputs |= hash_outputs(layout.split, small + [layout.split_rejects])
    return StageResult(
        outputs=dict(sorted(outputs.items())),
        counts={"samples_in": samples_in, "written": own, "ooc_copies": ooc_copies, "experts": expert_counts,
                "rejected": by_reason, "shards_in": len(shards), "shards_missing": len(missing)},
        extra={"num_experts": num_experts,
               "input_shards": [str(p) if is_remote(p) else str(p.resolve()) for p in shards],
               "missing_shards": missing,
               "input_stats": input_stats(shards)},
    )


STAGE = Stage(name="split", section="split", reads=("embed", "cluster"), fingerprint=fingerprint, work=work,
              on_cluster=True)
