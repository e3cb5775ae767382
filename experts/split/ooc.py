"""Out-of-cluster mixing (MoDE's `ooc_ratio`): which other experts also get a copy of a sample.

Every (sample key, expert) pair has a number in [0, 1) that depends on the
key's bytes and the expert alone, so the plan, the split (either path, any
process, a rerun) and `moda verify` all make the same choice without
sharing state. A sample goes to another expert e when its number for e is
below e's threshold, set so that e receives about `ooc_ratio` of its own size
from the other experts' samples.

Why this hash: it runs over all keys of a shard at once in numpy. A
cryptographic hash per (sample, other expert) in Python made the split
30-50% slower at the paper's 0.02. The choice only has to be deterministic
and spread evenly, not secret: FNV-1a over the key's bytes, then each expert
drawn from it by the splitmix64 finaliser (a well-mixed 64-bit permutation).
"""

from __future__ import annotations

import numpy as np

HASH = "fnv1a64+splitmix64"  # part of the split's fingerprint when ooc_ratio > 0
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def thresholds(own_counts: np.ndarray, ratio: float) -> np.ndarray:
    """Per expert, the share of the other experts' samples it takes: `ratio` of its own size."""
    others = own_counts.sum() - own_counts
    return np.where(others > 0, ratio * own_counts / np.maximum(others, 1), 0.0)


def fnv1a(keys: np.ndarray) -> np.ndarray:
    """64-bit FNV-1a of each key's bytes (`keys`: a numpy bytes array), one array round per byte."""
    keys = np.ascontiguousarray(keys, dtype=bytes)
    hashes = np.full(len(keys), _FNV_OFFSET, np.uint64)
    if not len(keys):
        return hashes
    data = keys.view(np.uint8).reshape(len(keys), keys.dtype.itemsize)
    lengths = np.strings.str_len(keys)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max())):
            hashes = np.where(lengths > j, (hashes ^ data[:, j]) * _FNV_PRIME, hashes)
    return hashes


def units(hashes: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """The number in [0, 1) of each (key hash, expert) pair, broadcast as numpy broadcasts."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point (numpy warns for scalars)
        z = np.asarray(hashes, np.uint64) + (np.asarray(experts, np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def copied_to(keys: np.ndarray, expert: int, limits: np.ndarray) -> np.ndarray:
    """Per key: whether a sample with that key (of another expert) has a copy in `expert`."""
    return units(fnv1a(keys), expert) < limits[expert]


def copies(keys: np.ndarray, own: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """(samples, experts) bool: the other experts that get a copy of each sample (never its own)."""
    chosen = units(fnv1a(keys)[:, None], np.arange(len(limits))[None, :]) < np.asarray(limits)[None, :]
    chosen[np.arange(len(keys)), np.asarray(own, np.int64)] = False
    return chosen
