"""Scaling laws of downstream error against training compute, as pure functions of arrays.

The OpenCLIP scaling-law study fits, per task, a saturating power law
err(C) = A * C^(-alpha) + E_inf to the points on the compute-Pareto frontier
(for every compute, the lowest error any model reached with at most that
much). Here the same, per system (the single model, MoDE-n), so that two
curves can be compared where no run was made:

- `fit_power_law`: scipy's `curve_fit` on compute scaled by the smallest one
  (A is then the excess error at the smallest budget, and the fit does not
  handle numbers like 1e18), started from a straight line in log-log space,
  alpha kept in (0, 4) and E_inf in [0, the lowest error seen).
- `refit`: intervals by refitting on redrawn errors. With four to six
  budgets, resampling the points themselves leaves too few distinct ones for
  a three-parameter fit, so the test samples are redrawn instead (the caller
  resamples them once per redraw for every point and system alike, so two
  systems' curves stay paired on the same images): this carries the test-set
  noise behind every point into alpha, the predictions and the crossing.
- `holdout_check`: fit on all but the largest budget, predict the largest:
  how far the law can be trusted one step out.
- `crossing` and `compute_multiplier`: where MoDE-n's curve meets the single
  model's, and how much compute the single model needs to reach MoDE-n's
  error at a given budget (the "effective compute" the experts are worth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    """err(C) = a * (C / c0)^(-alpha) + e_inf."""

    a: float
    alpha: float
    e_inf: float
    c0: float

    def __call__(self, compute) -> np.ndarray:
        return self.a * (np.asarray(compute, dtype=float) / self.c0) ** (-self.alpha) + self.e_inf

    def compute_for(self, err) -> np.ndarray:
        """The compute at which the law reaches `err` (inf at or below its floor e_inf)."""
        err = np.asarray(err, dtype=float)
        excess = np.where(err > self.e_inf, (err - self.e_inf) / self.a, np.nan)
        out = self.c0 * excess ** (-1.0 / self.alpha)
        return np.where(np.isnan(out), np.inf, out)


def pareto_frontier(compute, err) -> np.ndarray:
    """Indices (by increasing compute) of the points no cheaper-or-equal point beats: for each, its
    error is lower than every point of at most its compute."""
    compute, err = np.asarray(compute, dtype=float), np.asarray(err, dtype=float)
    order = np.lexsort((err, compute))
    keep, best = [], np.inf
    for i in order:
        if err[i] < best:
            keep.append(int(i))
            best = err[i]
    return np.asarray(keep, dtype=int)


def fit_power_law(compute, err) -> PowerLaw:
    """The saturating power law through (compute, err) points (at least 3 distinct computes)."""
    from scipy.optimize import curve_fit

    compute, err = np.asarray(compute, dtype=float), np.asarray(err, dtype=float)
    if len(np.unique(compute)) < 3:
        raise ValueError(f"a power law with a floor needs points at 3 or more computes, got {len(np.unique(compute))}")
    c0 = float(compute.min())
    x = compute / c0
    floor_cap = max(float(err.min()), 1e-9)
    # start: a straight line in log-log space with the floor at half the lowest error
    e0 = 0.5 * floor_cap
    slope, intercept = np.polyfit(np.log(x), np.log(np.maximum(err - e0, 1e-9)), 1)
    p0 = (float(np.exp(intercept)), float(np.clip(-slope, 1e-3, 3.9)), e0)

    def law(x, a, alpha, e_inf):
        return a * x ** (-alpha) + e_inf

    params, _ = curve_fit(law, x, err, p0=p0, bounds=([1e-12, 1e-4, 0.0], [np.inf, 4.0, floor_cap]),
                          maxfev=20_000)
    return PowerLaw(float(params[0]), float(params[1]), float(params[2]), c0)


def fit_frontier(compute, err) -> PowerLaw:
    """The law through the compute-Pareto frontier of (compute, err) (ValueError: under 3 computes)."""
    keep = pareto_frontier(compute, err)
    return fit_power_law(np.asarray(compute, dtype=float)[keep], np.asarray(err, dtype=float)[keep])


def refit(compute, draws) -> list[PowerLaw | None]:
    """The frontier's law of every redraw of the errors (`draws`: redraws x points), None where a
    redraw leaves under 3 frontier computes or curve_fit does not converge: the caller says how many
    of the redraws gave a law."""
    fits: list[PowerLaw | None] = []
    for err in np.asarray(draws, dtype=float):
        try:
            fits.append(fit_frontier(compute, err))
        except (RuntimeError, ValueError):
            fits.append(None)
    return fits


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of finite `values` (nan, nan when none is)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def holdout_check(compute, err) -> dict:
    """Fit on every budget but the largest, predict the largest: {"predicted", "observed", "error"}
    (None when fewer than 4 budgets leave too few to fit)."""
    compute, err = np.asarray(compute, dtype=float), np.asarray(err, dtype=float)
    largest = compute.max()
    rest = compute < largest
    if len(np.unique(compute[rest])) < 3:
        return {"predicted": None, "observed": float(err[~rest].min()), "error": None}
    law = fit_power_law(compute[rest], err[rest])
    predicted, observed = float(law(largest)), float(err[~rest].min())
    return {"predicted": predicted, "observed": observed, "error": predicted - observed}


def crossing(single: PowerLaw, other: PowerLaw, low: float, high: float, points: int = 2001) -> float | None:
    """The compute in [low, high] where `other` first becomes better than `single` or stops being
    better (the first sign change of their difference, refined on a log grid); None without one."""
    grid = np.geomspace(low, high, points)
    diff = other(grid) - single(grid)
    change = np.flatnonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)
    if not change.size:
        return None
    i = int(change[0])
    # linear interpolation of the difference in log-compute between the two grid points
    t = diff[i] / (diff[i] - diff[i + 1])
    return float(np.exp(np.log(grid[i]) + t * (np.log(grid[i + 1]) - np.log(grid[i]))))


def compute_multiplier(single: PowerLaw, other: PowerLaw, compute) -> np.ndarray:
    """At each budget C: the compute the single model needs to reach `other`'s error at C, over C
    (above 1: the other system is worth more compute than it used; inf: below the single model's
    floor)."""
    compute = np.asarray(compute, dtype=float)
    return single.compute_for(other(compute)) / compute
