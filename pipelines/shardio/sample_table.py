"""A plain tar's samples as arrays: how the split decides for a whole shard at once.

`sample_table` groups the members of a `PlainTar` (tar_read.py) into samples
exactly as `shards.iter_samples` groups them, without a Python loop over the
members, so the split can route, deduplicate and check a shard's samples with
numpy and copy the ones that need no change as they lie.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipelines.shardio.shards import Sample, split_member_name
from pipelines.shardio.tar_read import BLOCK, PlainTar

PASS_THROUGH = ("jpg", "txt", "json")
"""The files of a sample the split may copy as they lie in the input tar (a jpg, and text beside it)."""
_EXT_CODES = tuple((ext.encode(), 1 << i) for i, ext in enumerate(PASS_THROUGH))  # jpg: 1
_OTHER = 1 << len(PASS_THROUGH)


class SampleTable(NamedTuple):
    """The samples of a `PlainTar` as arrays, one entry per sample in order (members grouped by
    key as `iter_samples` groups them).

    `keys`: dtype S; `first`/`count`: its members' indices in the tar; `begin`/`end`:
    its bytes in the tar, headers and padding included; `distinct`: no extension
    repeats; `plain`: its files are a jpg, a txt and perhaps a json, each once
    (what the split may pass through as it lies); `jpg`: its jpg member, or -1.
    """

    keys: np.ndarray
    first: np.ndarray
    count: np.ndarray
    begin: np.ndarray
    end: np.ndarray
    distinct: np.ndarray
    plain: np.ndarray
    jpg: np.ndarray

    def key(self, i: int) -> str:
        return self.keys[i].decode("utf-8", "surrogateescape")

    def sample(self, tar: PlainTar, i: int) -> Sample:
        """Sample i as `iter_samples(views=True)` yields it."""
        files = {}
        for m in range(int(self.first[i]), int(self.first[i] + self.count[i])):
            ext = split_member_name(tar.names[m].decode("utf-8", "surrogateescape"))[1]
            start = int(tar.heads[m]) + BLOCK
            files[ext] = tar.view[start:start + int(tar.sizes[m])]
        raw = tar.view[int(self.begin[i]):int(self.end[i])] if self.distinct[i] else None
        return Sample(key=self.key(i), files=files, raw=raw)


def key_bytes(keys) -> np.ndarray:
    """Sample keys (str) as a numpy bytes array, encoded as tar member names are (UTF-8, odd bytes kept)."""
    return np.array([k.encode("utf-8", "surrogateescape") for k in keys], dtype=bytes)


def sample_table(tar: PlainTar) -> SampleTable:
    """Group a plain tar's members into samples without a Python loop over them."""
    names = tar.names
    slash = np.strings.rfind(names, b"/")
    dot = np.strings.find(names, b".", slash + 1)
    width = names.dtype.itemsize
    keys = np.strings.slice(names, 0, np.where(dot >= 0, dot, width))
    exts = np.strings.slice(names, np.where(dot >= 0, dot + 1, width), width)
    new = np.ones(len(names), bool)
    new[1:] = keys[1:] != keys[:-1]
    first = np.flatnonzero(new)
    count = np.diff(np.append(first, len(names)))
    code = np.full(len(names), _OTHER, np.int64)
    for ext, value in _EXT_CODES:
        code[exts == ext] = value
    sample = np.cumsum(new) - 1
    order = np.lexsort((exts, sample))
    repeated = (sample[order][1:] == sample[order][:-1]) & (exts[order][1:] == exts[order][:-1])
    distinct = np.ones(len(first), bool)
    distinct[sample[order][1:][repeated]] = False
    union = np.bitwise_or.reduceat(code, first)
    plain = distinct & (union & _OTHER == 0) & (union & 3 == 3)  # a jpg and a txt at least
    jpg = np.full(len(first), -1, np.int64)
    jpg_members = np.flatnonzero(code == 1)
    jpg[sample[jpg_members]] = jpg_members
    ends = tar.ends
    return SampleTable(keys[first], first, count, tar.heads[first], ends[first + count - 1], distinct, plain, jpg)
