"""Interleaved pairs and fitted slopes: the one way moda's benchmarks compare with a peer.

Why: on a shared 2-core machine one run of A then one of B measures the machine's drift as much as
the code (single figures here move by up to 15% between runs). So every ratio a benchmark prints
comes from pairs run A B, B A, A B, ... (the order alternates, so neither side always runs first,
warm or cold), one ratio per pair, reported as the median with the range over the pairs. A range
that spans 1 is inside the noise, and `Ratio.__str__` says so.

"Flat per item" claims (time per shard at 10x the shards) are not a ratio of two totals, which a
fixed start-up cost bends: `fit_line` fits time = fixed + per_item * n over at least three sizes
and `slopes` gives the marginal per-item cost between neighbouring sizes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

A = TypeVar("A")
B = TypeVar("B")


@dataclass(frozen=True)
class Ratio:
    """Per-pair ratios of one comparison (above 1: the first-named side is ahead, as its name says)."""

    name: str
    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def inside_noise(self) -> bool:
        return self.low <= 1.0 <= self.high

    def as_dict(self) -> dict:
        return {"name": self.name, "median": round(self.median, 4), "low": round(self.low, 4),
                "high": round(self.high, 4), "pairs": len(self.values),
                "values": [round(v, 4) for v in self.values], "inside_noise": self.inside_noise()}

    def __str__(self) -> str:
        text = (f"{self.name}: median {self.median:.2f}x, range {self.low:.2f}-{self.high:.2f}x "
                f"over {len(self.values)} interleaved pairs")
        return text + ("; inside the noise (the range spans 1)" if self.inside_noise() else "")


def alternate(a: Callable[[int], A], b: Callable[[int], B], pairs: int,
              report: Callable[[int, A, B], None] | None = None) -> list[tuple[A, B]]:
    """Run a(r) and b(r) in `pairs` pairs of alternating order (A B, B A, ...); [(a's, b's) per pair]."""
    out = []
    for r in range(pairs):
        if r % 2 == 0:
            x = a(r)
            y = b(r)
        else:
            y = b(r)
            x = a(r)
        out.append((x, y))
        if report:
            report(r, x, y)
    return out


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of fn()."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def fit_line(sizes: list[float], values: list[float]) -> tuple[float, float]:
    """Least-squares (fixed, per_item) of values = fixed + per_item * size."""
    if len(sizes) < 2 or len(set(sizes)) < 2:
        raise ValueError("a line needs at least two distinct sizes")
    mx, my = statistics.fmean(sizes), statistics.fmean(values)
    per = sum((x - mx) * (y - my) for x, y in zip(sizes, values)) / sum((x - mx) ** 2 for x in sizes)
    return my - per * mx, per


def slopes(sizes: list[float], values: list[float]) -> list[float]:
    """Marginal cost per item between neighbouring sizes (sorted by size)."""
    points = sorted(zip(sizes, values))
    return [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in zip(points, points[1:])]
