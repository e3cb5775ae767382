"""Reading and writing img2dataset-style WebDataset shards.

A shard is a tar of samples, each a run of consecutive members sharing a key:
`<key>.jpg`, `<key>.txt`, `<key>.json`. Readers group members by key and say
exactly where a shard is broken instead of dropping the rest silently; the
writer rolls over to a new shard every `shard_size` samples and publishes each
shard by renaming it into place, so readers never see a half-written tar.
"""

from __future__ import annotations

import glob
import io
import json
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.layout import SHARD_SUFFIXES, SIZES, shard_id, shard_name
from pipelines.core.manifest import atomic_path, atomic_write_json
from pipelines.core.shard_url import ShardURL, is_remote
from pipelines.shardio.decompress import TarUnsupported
from pipelines.shardio.remote_shards import list_shards
from pipelines.shardio.tar_read import BLOCK, index_tar, padded_end
from pipelines.shardio.tar_write import TarShardWriter

REJECT_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string())])
TRUNCATED = "truncated_tar"
IGNORED = "ignored_file"
UNREADABLE = "unreadable_shard"


class ShardError(RuntimeError):
    """A shard that could not be read to its end: `reason` is `truncated_tar` (damaged: what came
    before the damage was read) or `unreadable_shard` (nothing in it could be read)."""

    def __init__(self, message: str, reason: str = "truncated_tar"):
        super().__init__(message)
        self.reason = reason

    def row(self, shard: str) -> dict:
        """The keyless reject row that records it."""
        return {"key": "", "shard": shard, "reason": f"{self.reason}: {self}"}


@dataclass
class Sample:
    """One sample: its key and its files by extension (`jpg`, `txt`, ...)."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    raw: memoryview | None = None
    """With `iter_samples(views=True)`: the sample's members exactly as they lie in the tar
    (headers, payloads, padding), when every one is a plain ustar member; else None."""
    problem: str | None = None
    """Why the reader already knows the sample is unusable (`damaged_member`, `non_utf8_name`)."""


def find_shards(spec: str | Path) -> tuple[list[Path | ShardURL], list[Path | str]]:
    """(shards found, shards named but absent) for a folder, a glob or a brace pattern.

    A folder lists its tars, plain or compressed (`layout.SHARD_SUFFIXES`), in name order, and not
    its hidden files (`.x.tar`, what a copy in progress or macOS leaves); a pattern takes what it
    names, hidden or not. Only a brace pattern or a plain name can name a shard that is not there
    (a folder or a glob lists what exists). Two shards with the same name but for the suffix are an
    error (their outputs would share a name), as is a pattern that names a folder.
    A URL or `pipe:` spec is listed by its store (`remote_shards.list_shards`).
    """
    spec = str(spec)
    if is_remote(spec):
        found, missing = list_shards(spec)
        _distinct_ids(found)
        return found, missing
    if os.path.isdir(spec) and not spec.endswith(SHARD_SUFFIXES):
        paths = sorted(p for p in Path(spec).iterdir()
                       if p.name.endswith(SHARD_SUFFIXES) and not p.name.startswith(".") and not p.is_dir())
    else:
        paths = []
        for pattern in braceexpand.braceexpand(spec):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            paths.extend(Path(m) for m in matches)
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise FileNotFoundError(f"{folders[0]} is a folder, not a tar shard: name the shards inside it "
                                f"(e.g. {folders[0]}/*.tar) or the folder that holds them")
    found = [p for p in paths if p.is_file()]
    missing = [p for p in paths if not p.is_file()]
    _distinct_ids(found)
    return found, missing


def _distinct_ids(found: list) -> None:
    ids: dict[str, object] = {}
    for path in found:
        other = ids.setdefault(shard_id(path), path)
        if other != path:
            raise ValueError(f"{other} and {path} are both shard {shard_id(path)!r}: keep one of them")


def expand_shards(spec: str | Path, missing: str = "error") -> list[Path | ShardURL]:
    """The shards `spec` names that are there (see `select_shards`)."""
    return select_shards(spec, missing)[0]


def select_shards(spec: str | Path, missing: str = "error") -> tuple[list[Path | ShardURL], list[str]]:
    """(the shards `spec` names that are there, the names of those that are not). An absent shard is
    an error, or with `missing="skip"` left out, for the caller to count and name (img2dataset leaves
    a few shards unwritten at LAION size). No shard at all is always an error.
    """
    found, absent = find_shards(spec)
    if absent and missing != "skip":
        raise FileNotFoundError(
            f"{len(absent)} shard(s) not found: {[str(p) for p in absent[:5]]}; set data.missing_shards: skip "
            "to train on the others (they are counted and named in the manifests)")
    if not found:
        what = f"none of the {len(absent)} shards named exist" if absent else (
            f"no .tar shards found (looked for names ending in {', '.join(SHARD_SUFFIXES)})")
        raise FileNotFoundError(f"{spec!r}: {what}")
    return found, [str(p) for p in absent]


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/abc.jpg` -> (`dir/abc`, `jpg`); the key ends at the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext if dot else ""


IGNORED_NAMES = (".DS_Store", "Thumbs.db", "desktop.ini")


def ignorable(name: str) -> bool:
    """Files an archiver or a desktop leaves beside the data: macOS AppleDouble `._*` files, hidden
    files (a base name starting with a dot, which would make an empty key), `.DS_Store` and the like."""
    base = name.rpartition("/")[2]
    return base.startswith(".") or base in IGNORED_NAMES or name.startswith("__MACOSX/")


def ignorable_mask(names: np.ndarray) -> np.ndarray:
    """`ignorable` of every member name of a tar at once (names as a numpy bytes array): the split's
    array path asks it for a whole shard."""
    skip = np.strings.startswith(names, b".") | (np.strings.find(names, b"/.") >= 0) \
        | np.strings.startswith(names, b"__MACOSX/")
    for name in IGNORED_NAMES:
        skip |= (names == name.encode()) | np.strings.endswith(names, b"/" + name.encode())
    return skip


def printable_key(key: str) -> str:
    """A key with its bytes that are not UTF-8 shown escaped (`caf\\xe9`): what rejects name it by."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Open:
    """A sample being gathered: its files, and where its members lie (for `raw`)."""

    __slots__ = ("sample", "first", "end", "plain")

    def __init__(self, sample: Sample, first: int):
        self.sample, self.first, self.end, self.plain = sample, first, first, True


def iter_samples(path: str | Path, *, views: bool = False, skipped: list[str] | None = None) -> Iterator[Sample]:
    """Yield the samples of one shard, in the order of their first member.

    Members are grouped by key wherever they lie in the tar (a tar made by
    extension, `tar cf x.tar *.jpg *.txt`, holds every image before every
    caption); a member whose key already has a file of its extension starts
    a new sample of that key (a repeated sample, which the stages reject as
    `duplicate_key`). The tar's index is read once, so memory grows with its
    member count, not its bytes. Files that are not data (`._*`, hidden
    files, `.DS_Store`, directories, links) are skipped and their names
    appended to `skipped`.

    Damage: every sample whose members lie before it is yielded, then
    ShardError is raised, so callers can count the loss. A sample whose
    member the damage cut is yielded with `problem = "damaged_member"`, one
    whose name is not UTF-8 with `problem = "non_utf8_name"` and its key
    escaped; neither is ever written to an expert.

    `views=True` gives payloads as memoryviews of the mapped file instead of
    bytes, and each sample's `raw` bytes (its members exactly as they lie,
    when they are plain, adjacent and distinct), so a caller that passes
    samples through (the split) copies each byte once. The views are valid
    until the generator is closed and no longer referenced. Without views the
    shard is read with pread(), each sample's payloads when it is yielded
    (`tar_read.FileReader`): the process holds one sample's bytes, not the
    shard's mapped pages.
    """
    try:
        index = index_tar(path, mapped=views)
    except TarUnsupported as err:
        raise ShardError(str(err), UNREADABLE) from err
    if skipped is not None:
        skipped.extend(index.skipped)
    view = index.view
    order: list[_Open] = []
    latest: dict[str, _Open] = {}
    for name, header, start, size, is_plain in index.members:
        if ignorable(name):
            if skipped is not None:
                skipped.append(name)
            continue
        key, ext = split_member_name(name)
        entry = latest.get(key)
        if entry is None or ext in entry.sample.files:
            entry = latest[key] = _Open(Sample(key=key), header)
            order.append(entry)
        entry.sample.files[ext] = (start, size)  # where it lies: read (or viewed) only when yielded
        entry.plain = entry.plain and is_plain and header == entry.end
        entry.end = padded_end(start - BLOCK, size)  # the payload starts one block after its (last) header
    if index.cut_member is not None and not ignorable(index.cut_member):
        key = split_member_name(index.cut_member)[0]
        entry = latest.get(key)
        if entry is None:
            entry = _Open(Sample(key=key), -1)
            order.append(entry)
        entry.sample.problem = "damaged_member"
    for entry in order:
        sample = entry.sample
        if not _utf8(sample.key):
            sample.key, sample.problem = printable_key(sample.key), "non_utf8_name"
        sample.files = {ext: view[start:start + size] for ext, (start, size) in sample.files.items()}
        if not views:  # a reader's slices are bytes already; a decompressed shard's map gives views
            sample.files = {ext: bytes(payload) for ext, payload in sample.files.items()}
        elif entry.plain and entry.first >= 0:
            sample.raw = view[entry.first:entry.end]
        yield sample
        entry.sample = None  # yielded: the caller holds it, or lets it go
    if index.damage:
        raise ShardError(f"{index.damage}; {len(order)} sample(s) before the damage were read, "
                         "anything after it is lost")


def _utf8(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_caption(sample: Sample) -> tuple[str | None, str | None]:
    """The sample's caption, or (None, reason) when it has none usable.

    A caption that is empty once Unicode whitespace, control and format
    characters (NUL, zero-width spaces, BOMs) are removed is `empty_caption`;
    the text kept is the caption stripped of surrounding whitespace only.
    """
    if sample.problem:
        return None, sample.problem
    raw = sample.files.get("txt")
    if raw is None:
        return None, "key_contains_dot" if dotted(sample, ("txt",)) else "missing_caption"
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8_caption"
    text = text.strip()
    if not visible(text):
        return None, "empty_caption"
    return text, None


def visible(text: str) -> bool:
    """Whether any character is neither whitespace nor a control, format or unassigned one."""
    return any(not ch.isspace() and unicodedata.category(ch)[0] != "C" for ch in text)


def dotted(sample: Sample, wanted: tuple[str, ...]) -> bool:
    """Whether the sample lacks `wanted` only because its files' names have more dots than the key
    rule expects (`photo.v1.jpg` is key `photo`, extension `v1.jpg`, as in webdataset)."""
    return any(ext.rpartition(".")[2] in wanted for ext in sample.files if "." in ext)


class ShardSetWriter:
    """Write samples into `out_dir/{00000..}.tar`, `shard_size` samples each.

    Each shard is written under a temporary name and renamed when full, and
    `sizes.json` (shard name -> sample count, the file open_clip_train reads
    instead of `--train-num-samples`) is written on close. `hashes` holds the
    sha256 of every closed shard, computed while writing.
    """

    def __init__(self, out_dir: str | Path, shard_size: int, start_index: int = 0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.index = start_index
        self.sizes: dict[str, int] = {}
        self.hashes: dict[str, str] = {}
        self._writer: TarShardWriter | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = shard_name(self.index)
        self._tmp = self.out_dir / f".{name}.tmp"
        self._writer = TarShardWriter(self._tmp)  # mtime 0: reproducible bytes
        self._count = 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        name = shard_name(self.index)
        self.hashes[name] = self._writer.close()
        os.replace(self._tmp, self.out_dir / name)
        self.sizes[name] = self._count
        self.index += 1
        self._writer = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self._writer is None:
            self._open()
        self._writer.add_sample(key, files)
        self._count += 1
        if self._count >= self.shard_size:
            self._close_shard()

    def close(self, write_sizes: bool = True) -> dict[str, int]:
        """Close the open shard and write `sizes.json` (not when several writers share the folder and
        their caller writes it once for all)."""
        self._close_shard()
        if write_sizes:
            atomic_write_json(self.out_dir / SIZES, self.sizes)
        return self.sizes

    @property
    def shard_paths(self) -> list[Path]:
        return [self.out_dir / name for name in sorted(self.sizes)]


def encode_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True).encode("utf-8")


def jpeg_bytes(image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_rejects(path: Path, rejects: list[dict]) -> None:
    """rejects.parquet: one row per rejected sample (key, shard, reason), plus rows with an empty
    key for what is not a sample: a damaged shard (`truncated_tar: ...`), an unreadable one
    (`unreadable_shard: ...`), a skipped file (`ignored_file: <name>`)."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), tmp)


def reason_class(reason: str) -> str:
    """A keyless row's reason without its details (`truncated_tar: a.tar: ...` -> `truncated_tar`)."""
    return reason.split(":", 1)[0]


def count_reasons(rejects: list[dict]) -> tuple[dict[str, int], int]:
    """(count per reason, number of rejected samples): keyless rows (a damaged shard, a skipped
    file) are counted by their reason's class but are not samples."""
    by_reason: dict[str, int] = {}
    samples = 0
    for r in rejects:
        reason = r["reason"] if r["key"] else reason_class(r["reason"])
        by_reason[reason] = by_reason.get(reason, 0) + 1
        samples += bool(r["key"])
    return by_reason, samples


def shard_notes(shard: str, skipped: list[str]) -> list[dict]:
    """The keyless reject rows of a shard's skipped files."""
    return [{"key": "", "shard": shard, "reason": f"{IGNORED}: {printable_key(name)}"} for name in skipped]
