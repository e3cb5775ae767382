"""`moda verify <run>`: check from the files alone that the split lost nothing.

Re-reads the input shards named in the split manifest and every expert
shard, and checks:
  - every expert shard holds as many samples as sizes.json says, with the
    sha256 its expert manifest records, and every sample in it has its
    caption (txt) and its image;
  - every key in an expert is either assigned to that expert by the cluster
    stage or one of its deterministic out-of-cluster copies;
  - input keys == own-expert keys + rejected keys, as multisets: no sample
    lost, none duplicated.
Memory does not grow with the dataset: keys are compared as 128-bit hashes
in spill partitions (`pipelines.shardio.spill`), and only the few keys a message
names are read again.

Input keys, two ways (`input_keys`, `moda verify --inputs`): `read` (the default) reads every input shard
again, which for LAION-400M on S3 is a second transfer of the whole data set;
`recorded` takes each input shard's keys from what the embed stage wrote of it
(the key column of its embeddings file and its rows of rejects.parquet: every
sample it read), once every input shard is shown to be the one the split read
(a remote one by its listing's size and version, one request per folder; a
local one by the sha256 its manifests recorded while its size and mtime hold).
The expert shards are read in both.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from experts.shard_sets import shard_set, shard_set_manifest
from experts.split import ooc
from experts.split.images import IMAGE_EXTS
from pipelines.core.layout import MANIFEST, RunLayout, expert_name, shard_id
from pipelines.core.manifest import file_sha256, read_manifest, require_manifest, source_hashes
from pipelines.core.shard_url import ShardURL, is_remote
from pipelines.shardio.remote_shards import look_up_shards
from pipelines.shardio.sample_table import key_bytes
from pipelines.shardio.shards import ShardError, iter_samples
from pipelines.shardio.spill import HashSpill, key_hashes, partitions_for

EXAMPLES = 5
_KEY = [("h1", "<u8"), ("h2", "<u8")]
_ASSIGNED = np.dtype(_KEY + [("row", "<i8"), ("expert", "<i4")])
_INPUT = np.dtype(_KEY + [("shard", "<i4")])
_WRITTEN = np.dtype(_KEY + [("shard", "<i4"), ("expert", "<i4"), ("ooc_ok", "?")])
_REJECTED = np.dtype(_KEY)


def _keys(path: Path, incomplete: list[str] | None = None) -> tuple[list[str], bool]:
    """A shard's sample keys, and whether it is damaged; with `incomplete`, the keys of samples that
    lack their caption or image are appended to it (every member is read)."""
    keys, truncated = [], False
    try:
        for sample in iter_samples(path):
            keys.append(sample.key)
            if incomplete is not None and ("txt" not in sample.files
                                           or not any(e in sample.files for e in IMAGE_EXTS)):
                incomplete.append(sample.key)
    except ShardError:
        truncated = True
    return keys, truncated


def _records(dtype: np.dtype, keys: list[str], **fields) -> np.ndarray:
    records = np.empty(len(keys), dtype=dtype)
    if keys:
        hashes = key_hashes(keys, bits=128)
        records["h1"], records["h2"] = hashes[:, 0], hashes[:, 1]
    for name, value in fields.items():
        records[name] = value
    return records


INPUT_MODES = ("read", "recorded")


def verify_split(run_dir: str | Path, input_keys: str = "read") -> tuple[list[str], dict]:
    """(problems, summary); no problems means the split is exact. `input_keys`: where the input shards'
    keys come from, the shards read again (`read`) or the embed stage's records of them
    (`recorded`, after their identity is checked; see the module's docstring).

    Keys are compared as 128-bit hashes bucketed into spill files
    (`pipelines.shardio.spill`), so memory stays bounded at any dataset size; the
    key names in the messages are looked up again in the shards they came from.
    """
    if input_keys not in INPUT_MODES:
        raise ValueError(f"input_keys must be one of {INPUT_MODES}, not {input_keys!r}")
    layout = RunLayout(Path(run_dir))
    split_dir = layout.split
    manifest = require_manifest(split_dir, "split")
    plan = json.loads(layout.split_plan.read_text())
    thresholds = np.array(plan["ooc_thresholds"])
    problems: list[str] = []
    inputs = [ShardURL(p) if is_remote(p) else Path(p) for p in manifest["input_shards"]]
    if input_keys == "recorded":
        problems += changed_inputs(layout, manifest, inputs)
    outputs: list[Path] = []
    parts = partitions_for(2 * manifest["counts"]["samples_in"] + manifest["counts"].get("ooc_copies", 0))
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=split_dir) as tmp:
        spills = {name: HashSpill(Path(tmp), name, dtype, parts) for name, dtype in
                  [("assigned", _ASSIGNED), ("input", _INPUT), ("written", _WRITTEN), ("rejected", _REJECTED)]}
        row = 0
        for batch in pq.ParquetFile(layout.assignments).iter_batches(1 << 14, columns=["key", "expert"]):
            keys = batch.column("key").to_pylist()
            spills["assigned"].add(_records(_ASSIGNED, keys, row=np.arange(row, row + len(keys)),
                                            expert=batch.column("expert").to_numpy()))
            row += len(keys)
        if input_keys == "read":  # remote: streamed again
            for i, path in enumerate(inputs):
                if not is_remote(path) and not path.is_file():
                    problems.append(f"input shard {path} is missing")
                    continue
                spills["input"].add(_records(_INPUT, _keys(path)[0], shard=i))
        else:
            for i, keys in recorded_input_keys(layout, inputs):
                spills["input"].add(_records(_INPUT, keys, shard=i))
        for e in range(manifest["num_experts"]):
            paths, sizes = shard_set(layout.expert_shards(e))
            recorded = shard_set_manifest(layout.expert_shards(e))["shards_sha256"]
            for path in paths:
                incomplete: list[str] = []
                keys, truncated = _keys(path, incomplete)
                if truncated:
                    problems.append(f"{path} is truncated")
                if incomplete:
                    problems.append(f"{path}: {len(incomplete)} sample(s) without their caption or image, "
                                    f"e.g. {incomplete[:EXAMPLES]}")
                if len(keys) != sizes[path.name]:
                    problems.append(f"{path}: {len(keys)} samples, sizes.json says {sizes[path.name]}")
                if file_sha256(path) != recorded.get(path.name):
                    problems.append(f"{path}: sha256 differs from {expert_name(e)}/{MANIFEST}")
                ooc_ok = ooc.copied_to(key_bytes(keys), e, thresholds) if thresholds[e] > 0 else False
                spills["written"].add(_records(_WRITTEN, keys, shard=len(outputs), expert=e, ooc_ok=ooc_ok))
                outputs.append(path)
        truncated_inputs = 0
        for batch in pq.ParquetFile(layout.split_rejects).iter_batches(1 << 14, columns=["key"]):
            keys = batch.column("key").to_pylist()
            truncated_inputs += sum(1 for k in keys if not k)  # a truncated shard's row has no key
            spills["rejected"].add(_records(_REJECTED, [k for k in keys if k]))
        for spill in spills.values():
            spill.close()
        tally = _Tally()
        for p in range(parts):
            tally.partition(*(spills[name].read(p) for name in ("assigned", "input", "written", "rejected")))
    problems += tally.problems(inputs, outputs)
    summary = {"samples_in": tally.samples_in, "in_experts": tally.own, "rejected": tally.rejected,
               "ooc_copies": tally.ooc, "truncated_inputs": truncated_inputs}
    return problems, summary


def changed_inputs(layout: RunLayout, split_manifest: dict, inputs: list) -> list[str]:
    """Problems for input shards that are gone or not the ones the split read, told without reading
    a remote byte: a remote shard by its listing now, a local one by its size and mtime (its sha256
    computed again only where they changed)."""
    remote = [str(p) for p in inputs if is_remote(p)]
    listed, absent = look_up_shards(remote)
    now = {shard_id(s): s for s in listed}
    local = [p for p in inputs if not is_remote(p)]
    problems = [f"input shard {p} is missing" for p in [*absent, *(p for p in local if not p.is_file())]]
    present = [p for p in local if p.is_file()] + listed
    recorded = split_manifest["inputs"]
    hashes = source_hashes(present, split_manifest, read_manifest(layout.embed))
    for path in present:
        stem = shard_id(path)
        if hashes[stem] != recorded.get(stem):
            problems.append(f"input shard {now.get(stem, path)} is not the one the split read (its "
                            f"{'listed size and version' if is_remote(path) else 'sha256'} changed): verify "
                            "it with --inputs read, or rerun from the embed stage")
    return problems


def recorded_input_keys(layout: RunLayout, inputs: list):
    """(input index, keys) for each input shard, from the embed stage's outputs: the keys of its
    embeddings file, then, in one pass over rejects.parquet, the samples it rejected (a keyless row
    is a note about a shard, not a sample)."""
    index = {shard_id(p): i for i, p in enumerate(inputs)}
    for stem, i in index.items():
        # ParquetFile, not read_table (the dataset API): half the time a file, 41,000 files a LAION run
        yield i, pq.ParquetFile(layout.embeddings(stem)).read(columns=["key"]).column("key").to_pylist()
    if layout.embed_rejects.is_file():
        for batch in pq.ParquetFile(layout.embed_rejects).iter_batches(1 << 14, columns=["key", "shard"]):
            by_shard: dict[int, list[str]] = {}
            for key, stem in zip(batch.column("key").to_pylist(), batch.column("shard").to_pylist()):
                if key and stem in index:
                    by_shard.setdefault(index[stem], []).append(key)
            yield from by_shard.items()


class _Tally:
    """Counts and example records, partition by partition (each holds every record of its keys)."""

    def __init__(self):
        self.samples_in = self.own = self.rejected = self.ooc = 0
        self.counts = dict.fromkeys(_MESSAGES, 0)
        self.examples: dict[str, list] = {name: [] for name in self.counts}

    def _note(self, kind: str, count: int, examples) -> None:
        self.counts[kind] += int(count)
        self.examples[kind] += examples[:EXAMPLES - len(self.examples[kind])]

    def partition(self, assigned, inputs, written, rejected) -> None:
        pairs = [np.stack([r["h1"], r["h2"]], axis=1) for r in (assigned, inputs, written, rejected)]
        uniq, ids = np.unique(np.concatenate(pairs), axis=0, return_inverse=True)
        ids = ids.reshape(-1)
        a_id, i_id, w_id, r_id = np.split(ids, np.cumsum([len(p) for p in pairs])[:-1])
        own_of = np.full(len(uniq), -1, dtype=np.int64)
        order = np.argsort(assigned["row"], kind="stable")
        keys_assigned, first_row = np.unique(a_id[order], return_index=True)  # a key's first row decides
        own_of[keys_assigned] = assigned["expert"][order][first_row]
        own = own_of[w_id]
        is_own = own == written["expert"]
        unassigned = own < 0
        misplaced = ~is_own & ~unassigned & ~written["ooc_ok"]
        self._note("unassigned", unassigned.sum(), [("written", written[i]) for i in np.flatnonzero(unassigned)])
        self._note("misplaced", misplaced.sum(), [("written", written[i]) for i in np.flatnonzero(misplaced)])
        self.ooc += int((~is_own & ~unassigned & written["ooc_ok"]).sum())
        own_count = np.bincount(w_id[is_own], minlength=len(uniq))
        repeated = np.flatnonzero(own_count > 1)
        self._note("repeated", repeated.size, [(*_example(k, i_id, inputs, w_id, written, "written"),
                                                int(own_count[k])) for k in repeated[:EXAMPLES]])
        in_count = np.bincount(i_id, minlength=len(uniq))
        accounted = own_count + np.bincount(r_id, minlength=len(uniq))
        for kind, diff in (("lost", in_count - accounted), ("extra", accounted - in_count)):
            where = np.flatnonzero(diff > 0)
            self._note(kind, diff[where].sum(), [_example(k, i_id, inputs, w_id, written) for k in where[:EXAMPLES]])
        self.samples_in += len(inputs)
        self.own += int(is_own.sum())
        self.rejected += len(rejected)

    def problems(self, inputs: list[Path], outputs: list[Path]) -> list[str]:
        names = _key_names([ex for kind in self.examples.values() for ex in kind], inputs, outputs)

        def label(example) -> str:
            source, record = example[0], example[1]
            if source == "hash":
                return "(a key found in rejects.parquet only)"
            key = names.get((int(record["h1"]), int(record["h2"])), "?")
            return f"{outputs[record['shard']]}: {key!r}" if source == "written" else repr(key)

        def named(example) -> str:
            return f"{label(example)} ({example[2]} times)" if len(example) > 2 else label(example)

        return [f"{self.counts[kind]} {text}, e.g. {', '.join(named(x) for x in self.examples[kind])}"
                for kind, text in _MESSAGES.items() if self.counts[kind]]


_MESSAGES = {
    "unassigned": "samples in expert shards were never assigned by the cluster stage",
    "misplaced": "samples are in an expert that is neither theirs nor one of their out-of-cluster copies",
    "repeated": "keys are written more than once to their expert",
    "lost": "input samples are neither in an expert nor rejected",
    "extra": "samples are accounted for more often than they occur in the input",
}


def _example(key_id: int, i_id, inputs, w_id, written, prefer: str = "input") -> tuple:
    """A record of key `key_id` to name it by: from the input shards, else from the expert shards."""
    sources = [("input", i_id, inputs), ("written", w_id, written)]
    for source, ids, records in sorted(sources, key=lambda s: s[0] != prefer):
        hits = np.flatnonzero(ids == key_id)
        if hits.size:
            return source, records[hits[0]]
    return "hash", None


def _key_names(examples: list, inputs: list[Path], outputs: list[Path]) -> dict[tuple[int, int], str]:
    """The key behind each example's hash, read again from the one shard each came from."""
    wanted: dict[Path, set] = {}
    for source, record, *_ in examples:
        if source in ("written", "input"):
            path = (outputs if source == "written" else inputs)[int(record["shard"])]
            wanted.setdefault(path, set()).add((int(record["h1"]), int(record["h2"])))
    names = {}
    for path, hashes in wanted.items():
        keys = _keys(path)[0]
        for key, (h1, h2) in zip(keys, key_hashes(keys, bits=128).tolist()):
            if (h1, h2) in hashes:
                names[(h1, h2)] = key
    return names
