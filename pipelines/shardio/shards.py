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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.layout import SIZES, shard_name
from pipelines.core.manifest import atomic_path, atomic_write_json
from pipelines.shardio.tar_read import BLOCK, TarDamage, TarIndex, index_tar, padded_end, read_members
from pipelines.shardio.tar_write import TarShardWriter

REJECT_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string())])
TRUNCATED = "truncated_tar"


class ShardError(RuntimeError):
    """A shard that could not be read to its end (truncated or corrupt tar)."""


@dataclass
class Sample:
    """One sample: its key and its files by extension (`jpg`, `txt`, ...)."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    raw: memoryview | None = None
    """With `iter_samples(views=True)`: the sample's members exactly as they lie in the tar
    (headers, payloads, padding), when every one is a plain ustar member; else None."""


def expand_shards(spec: str | Path) -> list[Path]:
    """Resolve a folder, a glob or a brace pattern (`a/{00000..00009}.tar`) to shards."""
    spec = str(spec)
    if os.path.isdir(spec):
        paths = sorted(Path(spec).glob("*.tar"))
    else:
        paths = []
        for pattern in braceexpand.braceexpand(spec):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            paths.extend(Path(m) for m in matches)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {[str(p) for p in missing[:5]]}")
    if not paths:
        raise FileNotFoundError(f"no .tar shards found at {spec!r}")
    return paths


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/abc.jpg` -> (`dir/abc`, `jpg`); the key ends at the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext if dot else ""


def iter_samples(path: str | Path, *, views: bool = False) -> Iterator[Sample]:
    """Yield the samples of one shard in order.

    Raises ShardError (after yielding every complete sample before the damage)
    when the tar is truncated or corrupt, so callers can count the loss. The
    sample being read when the damage shows (a tar cut exactly between two
    members shows only by its missing end-of-archive blocks) may have lost
    files, so it is not yielded.

    `views=True` gives payloads as memoryviews of the mapped file instead of
    bytes, and each sample's `raw` bytes, so a caller that passes samples
    through (the split) copies each byte once. The views are valid until the
    generator is closed and no longer referenced.
    """
    index = index_tar(path)
    if index is None:  # compressed: streamed through tarfile, no views and no raw bytes
        view, members = None, ((name, data, -1, -1) for name, data in read_members(path))
    else:
        view, members = index.view, _mapped_members(index, views)
    current: Sample | None = None
    first = end = 0
    plain = False
    try:
        for name, payload, header, stop in members:
            key, ext = split_member_name(name)
            if current is not None and current.key != key:
                if views and plain:
                    current.raw = view[first:end]
                yield current
                current = None
            if current is None:
                current, first, end, plain = Sample(key=key), header, header, True
            # raw bytes stand for the sample only if its members are plain, adjacent and distinct
            plain = plain and header >= 0 and header == end and ext not in current.files
            current.files[ext] = payload
            end = stop
    except TarDamage as err:
        raise ShardError(f"{err}; unreadable after sample {current.key if current else None!r}") from err
    if current is not None:
        if views and plain:
            current.raw = view[first:end]
        yield current


def _mapped_members(index: TarIndex, views: bool) -> Iterator[tuple[str, bytes | memoryview, int, int]]:
    """(name, payload, header offset or -1 when not a plain member, end offset), then the damage."""
    view = index.view
    for name, header, start, size, is_plain in index.members:
        payload = view[start:start + size]
        end = padded_end(start - BLOCK, size)  # the payload starts one block after its (last) header
        yield name, payload if views else payload.tobytes(), header if is_plain else -1, end
    if index.damage:
        raise TarDamage(index.damage)


def read_caption(sample: Sample) -> tuple[str | None, str | None]:
    """The sample's caption, or (None, reason) when it has none usable."""
    raw = sample.files.get("txt")
    if raw is None:
        return None, "missing_caption"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "non_utf8_caption"
    text = text.strip()
    if not text:
        return None, "empty_caption"
    return text, None


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

    def close(self) -> dict[str, int]:
        self._close_shard()
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
    """rejects.parquet: one row per rejected sample (key, shard, reason), plus one row
    with an empty key per truncated shard."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), tmp)


def count_reasons(rejects: list[dict]) -> tuple[dict[str, int], int]:
    """(count per reason, number of rejected samples): truncated-shard rows are counted
    by reason but are not samples (the damaged sample's key is unknown)."""
    by_reason: dict[str, int] = {}
    for r in rejects:
        reason = TRUNCATED if r["reason"].startswith(TRUNCATED) else r["reason"]
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return by_reason, sum(n for reason, n in by_reason.items() if reason != TRUNCATED)
