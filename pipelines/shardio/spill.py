"""Records bucketed by a hash of their key into spill files: group-bys over every sample of a
dataset in bounded memory.

Questions such as "which keys repeat" or "is every input key in exactly one
expert" need all keys together; a Python set or Counter of them costs ~100
bytes a sample (40 GB at LAION-400M). Instead each record (a key's hash plus a
few numbers) is appended to one of `partitions` files chosen by its hash;
all records of one key land in the same file, so each file can be answered
alone, with numpy, in memory bounded by one partition.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

PARTITION_ROWS = 1 << 22  # records per partition at most (about 100 MB at 24 bytes a record)


def partitions_for(records: int, partition_rows: int = PARTITION_ROWS) -> int:
    return max(1, math.ceil(records / partition_rows))


def key_hashes(keys: list[str], bits: int = 64) -> np.ndarray:
    """blake2b of each key (the same in every process and run): uint64 for bits=64, (N, 2)
    uint64 for bits=128, where a collision across billions of keys is out of the question."""
    words = bits // 64
    digest = b"".join(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8 * words).digest()
                      for k in keys)
    out = np.frombuffer(digest, dtype="<u8") if digest else np.empty(0, dtype="<u8")
    return out if words == 1 else out.reshape(-1, words)


class HashSpill:
    """Append records (a numpy structured dtype whose first field is a uint64 hash) to
    `partitions` files under `folder`, by that hash; read them back one partition at a time."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype, partitions: int):
        self.dtype = np.dtype(dtype)
        self.field = self.dtype.names[0]
        self.paths = [Path(folder) / f"{name}-{p}.bin" for p in range(partitions)]
        self._handles = [open(path, "wb") for path in self.paths]

    def add(self, records: np.ndarray) -> None:
        if not len(records):
            return
        which = records[self.field] % np.uint64(len(self.paths))
        for p in np.unique(which).tolist():
            records[which == p].tofile(self._handles[p])

    def close(self) -> None:
        for handle in self._handles:
            handle.close()

    def read(self, partition: int) -> np.ndarray:
        return np.fromfile(self.paths[partition], dtype=self.dtype)

    def __enter__(self) -> HashSpill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
