"""One input shard through the split: each valid sample to its output shards, each reject recorded.

Two read paths give the same bytes (tested): an intact tar of plain members
(what img2dataset and webdataset write) is decided for all its samples at
once with numpy (`_split_plain`), and runs of neighbouring samples bound for
the same output shard are copied as one piece; any other tar (damaged,
compressed, long names) is read sample by sample (`_split_streamed`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from experts.split import ooc
from experts.split.images import HUGE, PASS, plain_jpeg_verdicts, sample_output, sample_outputs
from experts.split.outputs import OutputShards
from experts.split.rows import AssignmentRows
from pipelines.core.config import SplitConfig
from pipelines.core.layout import shard_id
from pipelines.core.shard_url import is_remote
from pipelines.shardio.remote_shards import fetch_ahead, held
from pipelines.shardio.sample_table import SampleTable, key_bytes, sample_table
from pipelines.shardio.shards import ShardError, ignorable_mask, iter_samples, shard_notes, split_member_name
from pipelines.shardio.tar_read import PlainTar, index_plain_tar
from pipelines.shardio.tar_write import named_thread


def split_input_shard(shard_path: Path, plan: dict, assignments: AssignmentRows, caption_rejects: dict[str, str],
                      outputs: OutputShards, cfg: SplitConfig, threads: int = 1) -> dict:
    """Write one input shard's samples to their (not yet final) output shards.

    An intact tar of plain members (what img2dataset and webdataset write)
    takes `_split_plain`, which decides for all samples at once; any other tar
    (damaged, compressed, long names) is read sample by sample. Both give the
    same output, byte for byte (tested). `threads`: how many images the array
    path may decode at once.
    """
    shard = shard_id(shard_path)
    rows = assignments.of(shard)
    earlier = plan.get("earlier_shard_keys", {}).get(shard, [])  # kept where first seen
    with held(shard_path):  # a remote shard is fetched once, whichever path reads it
        tar = index_plain_tar(shard_path)
        table = sample_table(tar) if tar is not None else None
        if table is not None and grouped_as_read(tar, table):
            return _split_plain(tar, table, shard, rows, earlier, plan, caption_rejects, outputs, cfg, threads)
        return _split_streamed(shard_path, shard, rows, earlier, plan, caption_rejects, outputs, cfg)


def grouped_as_read(tar: PlainTar, table: SampleTable) -> bool:
    """Whether the array path's samples (runs of adjacent members sharing a key) are exactly the
    samples `iter_samples` yields (members grouped by key wherever they lie). They are when no
    file is to be skipped, every name is UTF-8, no run repeats an extension, and a key that comes
    back later comes back as a repeat of its sample (its first file's extension is one the earlier
    run has). Else the tar (made by extension, carrying `._*` files) is read sample by sample."""
    names = tar.names
    if ignorable_mask(names).any() or not table.distinct.all():
        return False
    try:
        b"\0".join(names.tolist()).decode("utf-8")
    except UnicodeDecodeError:
        return False
    _, first_run, which = np.unique(table.keys, return_index=True, return_inverse=True)
    later = np.flatnonzero(first_run[which] != np.arange(len(table.keys)))
    if not later.size:
        return True
    last_run = {bytes(table.keys[i]): int(i) for i in first_run[which[later]].tolist()}
    for i in later.tolist():  # rare: a repeated key; compare its run with the key's run before it
        key = bytes(table.keys[i])
        before = last_run[key]
        exts = {_ext(names[m]) for m in range(table.first[before], table.first[before] + table.count[before])}
        if _ext(names[table.first[i]]) not in exts:
            return False
        last_run[key] = i
    return True


def _ext(name: bytes) -> bytes:
    return split_member_name(name.decode("utf-8"))[1].encode()


def _split_streamed(shard_path: Path, shard: str, rows, earlier: list[str], plan: dict,
                    caption_rejects: dict[str, str], outputs: OutputShards, cfg: SplitConfig) -> dict:
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
    skipped: list[str] = []

    def reject(key: str, reason: str) -> None:
        rejects.append({"key": key, "shard": shard, "reason": reason})

    try:
        for sample in iter_samples(shard_path, views=True, skipped=skipped):
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
        rejects.append(err.row(shard))
    rejects += shard_notes(shard, skipped)
    return {"samples_in": samples_in, "own": own_written, "ooc": ooc_written, "rejects": rejects}


def _split_plain(tar: PlainTar, table: SampleTable, shard: str, rows, earlier: list[str], plan: dict,
                 caption_rejects: dict[str, str], outputs: OutputShards, cfg: SplitConfig, threads: int = 1) -> dict:
    """`_split_streamed`'s decisions for all samples of an intact plain tar at once (numpy).

    Only the samples the arrays cannot settle (an image that is not a plain
    RGB JPEG, files other than jpg/txt/json) take the per-sample decision, on
    `threads` threads; the rest are written as runs of their tar bytes,
    several samples a piece where they lie next to each other in the input.
    """
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

    reasons: dict[int, str] = dict.fromkeys(np.flatnonzero(duplicate).tolist(), "duplicate_key")
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


def _write_run(outputs: OutputShards, e: int, k: int, chosen: np.ndarray, table: SampleTable, tar: PlainTar,
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
    ahead, posix_fadvise WILLNEED, was measured to help little; reading does.) A remote shard is
    fetched ahead into the temporary copy the split will read (`remote_shards.fetch_ahead`)."""
    if is_remote(path):
        fetch_ahead(path)
        return
    named_thread("prefetch").submit(_read_through, path)


def _read_through(path: Path) -> None:
    """Read the file to the end without copying it anywhere: sent to /dev/null, in one system call
    that holds no GIL (a read loop needs the GIL between reads, and the parsing thread holds it)."""
    try:
        with open(path, "rb", buffering=0) as handle, open(os.devnull, "wb", buffering=0) as sink:
            done, size = 0, os.fstat(handle.fileno()).st_size
            while done < size and (sent := os.sendfile(sink.fileno(), handle.fileno(), done, size - done)) > 0:
                done += sent
    except OSError:
        pass  # only a hint: a shard that cannot be read is reported when it is split
