"""Stage 3, split: one WebDataset shard set per expert, readable by open_clip_train.

The MoDE reference code makes every expert stream every shard and filter at
read time; we materialise each expert's data once, exactly.

How it stays exact and restartable with constant memory:

1. Plan (from the cluster stage's assignments, no image is read): every
   assigned sample gets a *slot* in its expert's sequence (input shards in
   order, samples in order), plus, with `ooc_ratio > 0`, slots in other
   experts chosen by a hash of (key, expert) (MoDE's out-of-cluster mixing).
   Slot p of expert e goes to output shard p // shard_size_e. The plan is a
   small table of slot offsets per (input shard, expert), so which output
   shards an input shard feeds, and which input shard completes each output
   shard, are known up front.
2. Stream: each input shard is read once (memory-mapped); each valid sample
   is written to its slots, as the very bytes it has in the input tar when
   its files need no change. An intact tar of plain members is decided for
   all its samples at once with numpy (routing, duplicates, JPEG headers),
   and runs of neighbouring samples bound for the same output shard are
   copied as one piece; other tars are read sample by sample, to the same
   bytes. An output shard is closed and renamed into
   place as soon as the input shard that completes it is done (writing,
   hashing and renaming run in background threads), and a per-input-shard
   progress file records its counts and rejects.
3. Resume: a rerun after a kill keeps every output shard already renamed into
   place, skips every input shard whose progress file exists and whose output
   shards are all final, and rewrites only the unfinished output shards. The
   result is byte-identical to an uninterrupted run.

Rejected samples (no usable caption, undecodable or huge image, no image,
duplicate key, truncated tar) leave their slot empty and are counted by
reason and listed in rejects.parquet:   samples_in = sum(expert sizes) + rejected
(out-of-cluster copies are counted separately). Odd but valid images
(grayscale, RGBA, CMYK, 16-bit, PNG) are converted to RGB JPEG.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from experts import ooc
from experts.duplicate_keys import BATCH_ROWS, SPILL_PREFIX, duplicate_rows, earlier_shard_keys
from experts.images import HUGE, PASS, plain_jpeg_verdicts, sample_output, sample_outputs
from pipelines.config import SplitConfig, section_hash
from pipelines.devices import usable_cores
from pipelines.manifest import (
    atomic_write_json,
    combine,
    hash_outputs,
    input_stats,
    is_done,
    read_manifest,
    require_manifest,
    source_hashes,
    write_manifest,
)
from pipelines.shards import (
    TRUNCATED,
    SampleTable,
    ShardError,
    count_reasons,
    iter_samples,
    key_bytes,
    sample_table,
    write_rejects,
)
from pipelines.tarstream import PlainTar, TarShardWriter, background, index_plain_tar, named_thread

MANIFEST_NAME = "manifest.json"


def expert_dir_name(expert: int) -> str:
    return f"expert_{expert:03d}"


# ---------------------------------------------------------------- plan
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
    sizes = [max(1, min(cfg.shard_size, math.ceil(int(t) / cfg.min_shards))) for t in totals]
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


# ---------------------------------------------------------------- streaming
class _Outputs:
    """The open temporary output shards; each is renamed into place when complete.

    With several split processes, an output shard fed by input shards of more
    than one process (a `boundary` shard) is written by each of them as a
    fragment (members only, no end-of-archive), which the parent joins.
    """

    def __init__(self, stage_dir: Path, boundary: frozenset = frozenset(), worker: int = 0):
        self.stage_dir = stage_dir
        self.boundary = boundary
        self.worker = worker
        self.writers: dict[tuple[int, int], tuple[TarShardWriter, Path]] = {}
        self.counts: Counter = Counter()
        self.final: set[tuple[int, int]] = set()
        self.jobs: list = []
        for record in (stage_dir / "progress" / "outputs").glob("*.json"):
            e, k = (int(part) for part in record.stem.split("_"))
            if self.final_path(e, k).is_file():
                self.final.add((e, k))

    def final_path(self, e: int, k: int) -> Path:
        return self.stage_dir / expert_dir_name(e) / f"{k:05d}.tar"

    def record_path(self, e: int, k: int) -> Path:
        return self.stage_dir / "progress" / "outputs" / f"{e:03d}_{k:05d}.json"

    def is_final(self, e: int, k: int) -> bool:
        return (e, k) in self.final

    def fragment_path(self, e: int, k: int, worker: int) -> Path:
        return self.final_path(e, k).with_name(f".{k:05d}.tar.part{worker}")

    def _writer(self, e: int, k: int) -> TarShardWriter:
        if (e, k) not in self.writers:
            if (e, k) in self.boundary:
                tmp = self.fragment_path(e, k, self.worker)
            else:
                tmp = self.final_path(e, k).with_name(f".{k:05d}.tar.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            self.writers[(e, k)] = (TarShardWriter(tmp), tmp)
        return self.writers[(e, k)][0]

    def write(self, e: int, k: int, key: str, files: dict[str, bytes] | memoryview) -> None:
        """Append a sample: its files, or its members exactly as they lie in the input tar."""
        writer = self._writer(e, k)
        if isinstance(files, dict):
            writer.add_sample(key, files)
        else:
            writer.add_raw(files)
        self.counts[(e, k)] += 1

    def write_pieces(self, e: int, k: int, pieces: list[memoryview]) -> None:
        """Append pieces of an input tar as they lie (whole samples; the caller counts them)."""
        self._writer(e, k).add_raw(*pieces)

    def hand_over(self) -> None:
        for writer, _ in self.writers.values():
            writer.hand_over()

    def close_fragments(self) -> dict[str, int]:
        """Close this process's fragments of boundary shards; their sample counts by "e_k"."""
        counts = {}
        for (e, k) in [ek for ek in self.writers if ek in self.boundary]:
            writer, _ = self.writers.pop((e, k))
            writer.close_fragment()
            counts[f"{e}_{k}"] = self.counts.pop((e, k), 0)
        return counts

    def join(self, e: int, k: int, workers: int, samples: int) -> None:
        """Make a boundary shard from its fragments, in process order, and rename it into place."""
        tmp = self.final_path(e, k).with_name(f".{k:05d}.tar.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        writer = TarShardWriter(tmp)
        for worker in range(workers):
            part = self.fragment_path(e, k, worker)
            if part.is_file():
                with open(part, "rb") as fragment:  # in 1 MiB pieces: a fragment can be most of a shard
                    while piece := fragment.read(1 << 20):
                        writer.add_raw(piece)
                part.unlink()
        self.writers[(e, k)] = (writer, tmp)
        self.counts[(e, k)] = samples
        self.finalize(e, k)

    def finalize(self, e: int, k: int) -> None:
        """End the shard; its last bytes, its rename into place and its record follow in the background."""
        if (e, k) in self.writers:
            writer, tmp = self.writers.pop((e, k))
        else:  # every sample of this output shard was rejected: an empty, valid tar
            tmp = self.final_path(e, k).with_name(f".{k:05d}.tar.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            writer = TarShardWriter(tmp)
        self.jobs.append(writer.close_then(self._publish, e, k, tmp, self.counts.pop((e, k), 0)))
        self.final.add((e, k))

    def _publish(self, sha256: str, e: int, k: int, tmp: Path, samples: int) -> None:
        """Rename a written shard into place and record it (hashed chunk by chunk as written: the
        file is not read again here)."""
        final = self.final_path(e, k)
        final.unlink(missing_ok=True)
        tmp.rename(final)
        atomic_write_json(self.record_path(e, k), {"samples": samples, "sha256": sha256})

    def after(self, job, *args) -> None:
        """Run `job` once everything handed to the background writer so far is written."""
        self.jobs.append(background().submit(job, *args))

    def wait(self) -> None:
        """Wait for the background jobs (raising the first error)."""
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job.result()


class AssignmentRows:
    """The (key, expert) assignment rows of one input shard after another, from one pass over the file.

    The cluster stage writes the rows in input-shard order, so the plan knows
    each shard's row range (`assignment_rows`) and this reader streams them
    in batches, keeping only the current shard's rows: constant memory, and
    each row read once. Without ranges (rows not in shard order), each shard's
    rows are found by a filtered read of the whole file.
    """

    def __init__(self, path: Path, ranges: dict[str, list[int]] | None):
        self.path, self.ranges = path, ranges
        self._file = pq.ParquetFile(path)
        self._schema = pa.schema([self._file.schema_arrow.field(c) for c in ("key", "expert")])
        self._batches = None
        self._held: list = []  # batches not yet consumed, the first starting at row self._start
        self._start = self._end = 0

    def of(self, shard: str) -> pa.Table:
        """The shard's rows, in file order (shards asked in plan order are read once)."""
        if self.ranges is None:
            return pq.read_table(self.path, columns=["key", "expert"], filters=[("shard", "==", shard)])
        lo, hi = self.ranges[shard]
        if self._batches is None or lo < self._start:
            self._seek(lo)
        while self._end < hi:
            batch = next(self._batches)
            self._held.append(batch)
            self._end += batch.num_rows
        table = pa.Table.from_batches(self._held, schema=self._schema).slice(lo - self._start, hi - lo)
        while self._held and self._start + self._held[0].num_rows <= hi:  # what later shards no longer need
            self._start += self._held.pop(0).num_rows
        return table

    def _seek(self, row: int) -> None:
        """Start reading at the row group that holds `row`."""
        meta = self._file.metadata
        first, start = 0, 0
        while first < meta.num_row_groups - 1 and start + meta.row_group(first).num_rows <= row:
            start += meta.row_group(first).num_rows
            first += 1
        self._batches = self._file.iter_batches(BATCH_ROWS, row_groups=range(first, meta.num_row_groups),
                                                columns=self._schema.names)
        self._held, self._start, self._end = [], start, start


def split_input_shard(shard_path: Path, plan: dict, assignments: AssignmentRows, caption_rejects: dict[str, str],
                      outputs: _Outputs, cfg: SplitConfig, threads: int = 1) -> dict:
    """Write one input shard's samples to their (not yet final) output shards.

    An intact tar of plain members (what img2dataset and webdataset write)
    takes `_split_plain`, which decides for all samples at once; any other tar
    (damaged, compressed, long names) is read sample by sample. Both give the
    same output, byte for byte (tested). `threads`: how many images the array
    path may decode at once.
    """
    shard = shard_path.stem
    rows = assignments.of(shard)
    earlier = plan.get("earlier_shard_keys", {}).get(shard, [])  # kept where first seen
    tar = index_plain_tar(shard_path)
    if tar is not None:
        return _split_plain(tar, shard, rows, earlier, plan, caption_rejects, outputs, cfg, threads)
    return _split_streamed(shard_path, shard, rows, earlier, plan, caption_rejects, outputs, cfg)


def _split_streamed(shard_path: Path, shard: str, rows, earlier: list[str], plan: dict,
                    caption_rejects: dict[str, str], outputs: _Outputs, cfg: SplitConfig) -> dict:
    """Sample by sample, for any tar `iter_samples` reads."""
    cursor = list(plan["offsets"][shard])
    own_of: dict[str, int] = {}
    for key, own in zip(rows.column("key").to_pylist(), rows.column("expert").to_pylist()):
        own_of.setdefault(key, own)  # later rows of a repeated key were never given slots
    copied_to: dict[str, list[int]] = {}
    if cfg.ooc_ratio > 0 and own_of:
        chosen = ooc.copies(key_bytes(own_of), np.array(list(own_of.values())), np.array(plan["ooc_thresholds"]))
        copied_to = {key: np.flatnonzero(row).tolist() for key, row in zip(own_of, chosen)}
    earlier = set(earlier)
    sizes = plan["shard_sizes"]
    samples_in, own_written, ooc_written = 0, 0, 0
    rejects: list[dict] = []
    seen_here: set[str] = set()

    def reject(key: str, reason: str) -> None:
        rejects.append({"key": key, "shard": shard, "reason": reason})

    try:
        for sample in iter_samples(shard_path, views=True):
            samples_in += 1
            key = sample.key
            if key in seen_here or key in earlier:
                reject(key, "duplicate_key")
                continue
            own = own_of.get(key)
            if own is None:
                reject(key, "caption:" + caption_rejects.get(key, "not_embedded"))
                continue
            seen_here.add(key)
            targets = [own] + copied_to.get(key, [])
            slots = []
            for e in targets:
                slots.append((e, cursor[e] // sizes[e]))
                cursor[e] += 1
            files, reason = sample_output(sample, cfg.validate)
            if reason is not None:
                reject(key, reason)
                continue
            for e, k in slots:
                if not outputs.is_final(e, k):
                    outputs.write(e, k, key, files)
            own_written += 1
            ooc_written += len(slots) - 1
    except ShardError as err:
        reject("", f"{TRUNCATED}: {err}")
    return {"samples_in": samples_in, "own": own_written, "ooc": ooc_written, "rejects": rejects}


def _split_plain(tar: PlainTar, shard: str, rows, earlier: list[str], plan: dict,
                 caption_rejects: dict[str, str], outputs: _Outputs, cfg: SplitConfig, threads: int = 1) -> dict:
    """`_split_streamed`'s decisions for all samples of an intact plain tar at once (numpy).

    Only the samples the arrays cannot settle (an image that is not a plain
    RGB JPEG, files other than jpg/txt/json) take the per-sample decision, on
    `threads` threads; the rest are written as runs of their tar bytes,
    several samples a piece where they lie next to each other in the input.
    """
    table = sample_table(tar)
    keys, count = table.keys, len(table.keys)
    own = _own_experts(keys, rows)
    found = own >= 0
    _, first_seen, which = np.unique(keys, return_index=True, return_inverse=True)
    repeat = first_seen[which] != np.arange(count)
    duplicate = (repeat & found) | (np.isin(keys, key_bytes(earlier)) if earlier else False)
    placed = found & ~duplicate  # given slots, whatever becomes of the image
    num_experts = len(plan["shard_sizes"])
    targets = np.zeros((count, num_experts), bool)
    targets[np.flatnonzero(placed), own[placed]] = True
    if cfg.ooc_ratio > 0:
        targets[placed] |= ooc.copies(keys[placed], own[placed], np.array(plan["ooc_thresholds"]))
    slot = np.asarray(plan["offsets"][shard]) + np.cumsum(targets, 0) - 1
    out_shard = slot // np.asarray(plan["shard_sizes"])

    reasons: dict[int, str] = {i: "duplicate_key" for i in np.flatnonzero(duplicate).tolist()}
    for i in np.flatnonzero(~found & ~duplicate).tolist():
        reasons[i] = "caption:" + caption_rejects.get(table.key(i), "not_embedded")
    verdict = np.full(count, -1, np.int8)
    if cfg.validate == "header":
        settle = np.flatnonzero(placed & table.plain)
        jpg = table.jpg[settle]
        verdict[settle] = plain_jpeg_verdicts(tar.data, tar.heads[jpg] + 512, tar.sizes[jpg])
    for i in np.flatnonzero(verdict == HUGE).tolist():
        reasons[i] = "huge_image"
    rebuilt: dict[int, dict] = {}
    passed = verdict == PASS
    unsettled = np.flatnonzero(placed & (verdict != PASS) & (verdict != HUGE)).tolist()
    decided = sample_outputs([table.sample(tar, i) for i in unsettled], cfg.validate, threads)
    for i, (files, reason) in zip(unsettled, decided):
        if reason is not None:
            reasons[i] = reason
        elif isinstance(files, dict):
            rebuilt[i] = files
        else:
            passed[i] = True  # its tar bytes, as for PASS
    written = passed.copy()
    written[list(rebuilt)] = True

    for e in range(num_experts):
        chosen = np.flatnonzero(targets[:, e] & written)
        shards_of = out_shard[chosen, e]
        for run in np.split(chosen, np.flatnonzero(np.diff(shards_of)) + 1):
            if run.size and not outputs.is_final(e, int(out_shard[run[0], e])):
                _write_run(outputs, e, int(out_shard[run[0], e]), run, table, tar, passed, rebuilt)
    rejects = [{"key": table.key(i), "shard": shard, "reason": reasons[i]} for i in sorted(reasons)]
    own_written = int(written.sum())
    return {"samples_in": count, "own": own_written, "ooc": int(targets[written].sum()) - own_written,
            "rejects": rejects}


def _write_run(outputs: _Outputs, e: int, k: int, chosen: np.ndarray, table: SampleTable, tar: PlainTar,
               passed: np.ndarray, rebuilt: dict[int, dict]) -> None:
    """Write samples `chosen` (in order) to output shard (e, k): passed-through samples that lie
    next to each other in the input go as one piece of its bytes, all pieces in one call."""
    joined = passed[chosen[:-1]] & passed[chosen[1:]] & (table.end[chosen[:-1]] == table.begin[chosen[1:]])
    starts = np.flatnonzero(np.concatenate([[True], ~joined]))
    firsts, lasts = chosen[starts], chosen[np.append(starts[1:], len(chosen)) - 1]
    view = tar.view
    pieces: list = []
    for first, begin, end in zip(firsts.tolist(), table.begin[firsts].tolist(), table.end[lasts].tolist()):
        if passed[first]:
            pieces.append(view[begin:end])
        else:
            if pieces:
                outputs.write_pieces(e, k, pieces)
                pieces = []
            outputs.write(e, k, table.key(first), rebuilt[first])
    if pieces:
        outputs.write_pieces(e, k, pieces)
    outputs.counts[(e, k)] += int(passed[chosen].sum())


def _own_experts(keys: np.ndarray, rows) -> np.ndarray:
    """Each sample's expert by its key (the first assignment row of a key wins), or -1 if unassigned."""
    assigned = key_bytes(rows.column("key").to_pylist())
    if not assigned.size:
        return np.full(len(keys), -1, np.int64)
    unique, first_row = np.unique(assigned, return_index=True)
    at = np.minimum(np.searchsorted(unique, keys), len(unique) - 1)
    experts = rows.column("expert").to_numpy()[first_row[at]]
    return np.where(unique[at] == keys, experts, -1).astype(np.int64)


PREFETCH_SHARDS = 2  # input shards read ahead of the one being split


def prefetch(path: Path) -> None:
    """Read an input shard into the page cache on a background thread, so a dataset that is not
    in memory streams from disk while the shard before it is being split: the split's own reads
    are then page-cache hits, not page faults that wait on the disk. (Asking the kernel to read
    ahead, posix_fadvise WILLNEED, was measured to help little; reading does.)"""
    named_thread("prefetch").submit(_read_through, path)


def _read_through(path: Path) -> None:
    """Read the file to the end without copying it anywhere: sent to /dev/null, in one system call
    that holds no GIL (a read loop needs the GIL between reads, and the parsing thread holds it)."""
    import os

    try:
        with open(path, "rb", buffering=0) as handle, open(os.devnull, "wb", buffering=0) as sink:
            done, size = 0, os.fstat(handle.fileno()).st_size
            while done < size and (sent := os.sendfile(sink.fileno(), handle.fileno(), done, size - done)) > 0:
                done += sent
    except OSError:
        pass  # only a hint: a shard that cannot be read is reported when it is split


def _chunks(shards: list[Path], processes: int) -> list[list[Path]]:
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


def _die_with_parent() -> None:
    """A split process dies with the stage's (Linux PR_SET_PDEATHSIG), so a rerun never races it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
    except Exception:  # not Linux: the parent's pool still waits for its workers
        pass


def split_shards(chunk: list[Path], *, worker: int, plan: dict, order: list[str], assignments: Path,
                 caption_rejects: dict[str, str], stage_dir: Path, cfg: SplitConfig, boundary: frozenset,
                 num_experts: int, threads: int = 1) -> dict[str, int]:
    """One process's run of input shards, in order: write, finalize what completes, record progress.

    `threads`: its share of the cores for decoding the images that must be decoded.

    Returns the sample counts of its fragments of boundary shards ("e_k" -> count).
    """
    outputs = _Outputs(stage_dir, boundary, worker)
    closes_after: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for ek, s in completing_shard(plan, order).items():
        if ek not in boundary:
            closes_after[s].append(ek)
    progress_dir = stage_dir / "progress" / "inputs"
    rows = AssignmentRows(assignments, plan.get("assignment_rows"))
    requested = 0  # input shards [0, requested) of the chunk asked of the disk ahead of time
    for i, shard_path in enumerate(tqdm(chunk, desc=f"split {worker}", unit="shard", position=worker)):
        s = shard_path.stem
        touched = [(e, k) for e in range(num_experts) for k in output_shards_of(plan, s, e)]
        record = progress_dir / f"{s}.json"
        if record.is_file() and all(outputs.is_final(e, k) for e, k in touched):
            continue
        for ahead in chunk[max(requested, i):i + 1 + PREFETCH_SHARDS]:
            prefetch(ahead)
        requested = max(requested, i + 1 + PREFETCH_SHARDS)
        result = split_input_shard(shard_path, plan, rows, caption_rejects, outputs, cfg, threads)
        outputs.hand_over()  # the queued samples are views of this shard's map: let it go
        for e, k in sorted(closes_after.get(s, [])):
            if not outputs.is_final(e, k):
                outputs.finalize(e, k)
        # Once its samples are written. A rerun skips the shard only if every output shard it feeds
        # is also recorded as in place, so this record may land before the ones it completed.
        outputs.after(atomic_write_json, record, result)
    fragments = outputs.close_fragments()
    outputs.wait()
    return fragments


def load_embed_rejects(embed_dir: Path) -> dict[str, str]:
    path = embed_dir / "rejects.parquet"
    if not path.is_file():
        return {}
    table = pq.read_table(path)
    return {k: r for k, r in zip(table.column("key").to_pylist(), table.column("reason").to_pylist()) if k}


def split_fingerprint(cfg: SplitConfig, shards: list[Path], cluster_dir: Path, embed_dir: Path,
                      stage_dir: Path | None = None) -> tuple[str, dict[str, str]]:
    """(fingerprint, sha256 per input shard): config, the cluster stage's fingerprint, the input shards.

    The shards' hashes the embed stage (or this stage's last run) recorded are
    reused while the files keep their size and modification time.
    """
    upstream = require_manifest(cluster_dir, "cluster")
    hashes = source_hashes(shards, read_manifest(embed_dir), read_manifest(stage_dir) if stage_dir else None)
    return combine("split", split_config_hash(cfg), upstream["fingerprint"], hashes), hashes


def split_config_hash(cfg: SplitConfig) -> str:
    """The config's hash without `processes` (the output does not depend on it), and with the
    out-of-cluster hash's name when copies are made (a plan made with another would not fit)."""
    import dataclasses

    config = section_hash(dataclasses.replace(cfg, processes=0))
    return combine(config, ooc.HASH) if cfg.ooc_ratio > 0 else config


def run_split(cfg: SplitConfig, shards: list[Path], embed_dir: Path, cluster_dir: Path,
              stage_dir: Path) -> dict:
    started = time.time()
    upstream = require_manifest(cluster_dir, "cluster")
    config_hash = split_config_hash(cfg)
    fingerprint, hashes = split_fingerprint(cfg, shards, cluster_dir, embed_dir, stage_dir)
    if is_done(stage_dir, fingerprint):
        return {**read_manifest(stage_dir), "skipped": True}
    num_experts = upstream["num_experts"]
    order = [p.stem for p in shards]
    assignments = cluster_dir / "assignments.parquet"

    plan_path = stage_dir / "plan.json"
    previous = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if previous is None or previous.get("fingerprint") != fingerprint:
        for e in range(max(num_experts, previous.get("num_experts", 0) if previous else 0)):
            shutil.rmtree(stage_dir / expert_dir_name(e), ignore_errors=True)
        shutil.rmtree(stage_dir / "progress", ignore_errors=True)
        (stage_dir / MANIFEST_NAME).unlink(missing_ok=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        plan = make_plan(assignments, order, num_experts, cfg, workdir=stage_dir)
        atomic_write_json(plan_path, {"fingerprint": fingerprint, "num_experts": num_experts, **plan})
    else:
        plan = previous
    for stale in [*stage_dir.glob("expert_*/.*.tmp"), *stage_dir.glob("expert_*/.*.part*")]:
        stale.unlink()  # what a killed run was writing (every unfinished shard is written anew)
    for stale in stage_dir.glob(f"{SPILL_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed plan's spill files

    completes = completing_shard(plan, order)
    (stage_dir / "progress" / "inputs").mkdir(parents=True, exist_ok=True)
    chunks = _chunks(shards, cfg.processes)
    boundary = boundary_shards(plan, [[p.stem for p in chunk] for chunk in chunks], num_experts)
    job = dict(plan=plan, order=order, assignments=assignments, caption_rejects=load_embed_rejects(embed_dir),
               stage_dir=stage_dir, cfg=cfg, boundary=boundary, num_experts=num_experts,
               threads=max(1, usable_cores() // len(chunks)))
    if len(chunks) == 1:
        fragments = [split_shards(chunks[0], worker=0, **job)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(chunks), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_die_with_parent) as pool:
            futures = [pool.submit(split_shards, chunk, worker=w, **job) for w, chunk in enumerate(chunks)]
            fragments = [future.result() for future in futures]
    outputs = _Outputs(stage_dir)
    for e, k in sorted(boundary):
        if not outputs.is_final(e, k):
            samples = sum(counts.get(f"{e}_{k}", 0) for counts in fragments)
            outputs.join(e, k, len(chunks), samples)
    for e, k in sorted(completes):  # experts with no samples at all still get their shards listed
        if not outputs.is_final(e, k):
            outputs.finalize(e, k)
    outputs.wait()
    return _finish(cfg, stage_dir, shards, plan, num_experts, fingerprint, config_hash, upstream,
                   hashes, started)



def _finish(cfg, stage_dir, shards, plan, num_experts, fingerprint, config_hash, upstream,
            source_hashes, started) -> dict:
    """Per-expert sizes.json and manifests, rejects.parquet, the conservation check, the manifest."""
    records = [json.loads((stage_dir / "progress" / "inputs" / f"{p.stem}.json").read_text()) for p in shards]
    expert_counts = []
    for e in range(num_experts):
        folder = stage_dir / expert_dir_name(e)
        folder.mkdir(parents=True, exist_ok=True)
        sizes, hashes = {}, {}
        for k in range(plan["num_output_shards"][e]):
            out = json.loads((stage_dir / "progress" / "outputs" / f"{e:03d}_{k:05d}.json").read_text())
            sizes[f"{k:05d}.tar"] = out["samples"]
            hashes[f"{k:05d}.tar"] = out["sha256"]
        atomic_write_json(folder / "sizes.json", sizes)
        sources = sorted(p.stem for p in shards if plan["counts"][p.stem][e] > 0)
        atomic_write_json(folder / MANIFEST_NAME, {
            "expert": e, "samples": sum(sizes.values()), "sizes": sizes, "shards_sha256": hashes,
            "source_shards": sources, "shard_size": plan["shard_sizes"][e], "ooc_ratio": cfg.ooc_ratio,
        })
        expert_counts.append(sum(sizes.values()))
    rejects = [r for rec in records for r in rec["rejects"]]
    write_rejects(stage_dir / "rejects.parquet", rejects)
    by_reason, rejected = count_reasons(rejects)
    samples_in = sum(rec["samples_in"] for rec in records)
    own = sum(rec["own"] for rec in records)
    ooc = sum(rec["ooc"] for rec in records)
    if samples_in != own + rejected or sum(expert_counts) != own + ooc:
        raise RuntimeError(f"split does not add up: {samples_in} in, {own} written, {rejected} rejected, "
                           f"{ooc} out-of-cluster copies, {sum(expert_counts)} in expert shards")
    # The shards were hashed while written (progress records); only the small files are read here.
    outputs = {f"{expert_dir_name(e)}/{name}": digest for e in range(num_experts)
               for name, digest in json.loads((stage_dir / expert_dir_name(e) / MANIFEST_NAME).read_text())
               ["shards_sha256"].items()}
    small = [stage_dir / expert_dir_name(e) / f for e in range(num_experts) for f in ("sizes.json", MANIFEST_NAME)]
    outputs |= hash_outputs(stage_dir, small + [stage_dir / "rejects.parquet"])
    return write_manifest(
        stage_dir, stage="split", fingerprint=fingerprint, config_hash=config_hash,
        inputs={"cluster": upstream["fingerprint"], **source_hashes},
        outputs=dict(sorted(outputs.items())),
        counts={"samples_in": samples_in, "written": own, "ooc_copies": ooc, "experts": expert_counts,
                "rejected": by_reason},
        started=started,
        extra={"num_experts": num_experts, "input_shards": [str(p.resolve()) for p in shards],
               "input_stats": input_stats(shards)},
    )


def expert_shards(split_dir: Path, expert: int) -> tuple[list[Path], dict[str, int]]:
    """An expert's shard files and sizes.json content."""
    folder = split_dir / expert_dir_name(expert)
    sizes = json.loads((folder / "sizes.json").read_text())
    return [folder / name for name in sorted(sizes)], sizes
