"""Balanced spherical k-means and the two-stage MoDE clustering, as pure functions.

Everything here takes and returns numpy arrays; no files, no Prefect.

Why balanced: MoDE trains one expert per cluster, so a cluster that swallows
most of the data makes one expert do most of the work (the reference code's
plain coarse argmin gave 170M vs 230M pairs for two experts, and a plain
k-means of fine centres can leave experts empty).

The balancing is a capacity-constrained assignment: every (point, candidate
centre) pair among each point's `topk` nearest centres is visited once in
order of decreasing similarity, and a point takes the first centre that still
has room. Capacities sum to at least N, so it works for any N and k (no
divisibility assumption) and always terminates; the few points whose
candidates are all full go to the most similar centre that has room. Lloyd
updates then move the centres to their members' normalised means.
"""

from __future__ import annotations

import math

import faiss
import numpy as np


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def spherical_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """Plain FAISS spherical k-means: (N, d) unit rows -> (k, d) unit centroids.

    FAISS subsamples above 256 points per centroid; we lift that cap so every
    point given here is used (the caller decides the sample).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise ValueError(f"cannot fit {k} clusters to {x.shape[0]} points")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True,
                      max_points_per_centroid=max(256, math.ceil(x.shape[0] / k)))
    km.train(x, weights=None if weights is None else np.ascontiguousarray(weights, np.float32))
    return normalize_rows(km.centroids)


def top_candidates(x: np.ndarray, centroids: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner products and indices of each row's `topk` most similar centroids."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), min(topk, centroids.shape[0]))
    return sims, idx


def assign_nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's most similar centroid (inner product on unit vectors)."""
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    _, idx = top_candidates(x, centroids, 1)
    return idx[:, 0].astype(np.int64)


def capacity_assign(sims: np.ndarray, cand: np.ndarray, mass: np.ndarray,
                    capacity: np.ndarray, full_sims: np.ndarray | None = None) -> np.ndarray:
    """Greedy capacity-constrained assignment.

    sims, cand: (N, t) candidate similarities and centre indices per point.
    mass: (N,) how much of a centre's capacity each point uses (1 for samples,
    the number of training pairs for a fine cluster).
    capacity: (k,) room per centre; must sum to at least mass.sum().
    full_sims: optional (N, k) similarities for placing points whose candidates
    are all full; without it they go to the centre with the most room left.
    Returns (N,) centre index per point.
    """
    n, k = sims.shape[0], capacity.shape[0]
    labels = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.float64)
    order = np.argsort(-sims, axis=None, kind="stable")
    rows, cols = np.unravel_index(order, sims.shape)
    for i, j in zip(rows.tolist(), cols.tolist()):
        if labels[i] >= 0:
            continue
        c = cand[i, j]
        if load[c] + mass[i] <= capacity[c] + 1e-9:
            labels[i] = c
            load[c] += mass[i]
    # Points whose candidates were all full: heaviest first, to the best centre with room.
    for i in sorted(np.flatnonzero(labels < 0).tolist(), key=lambda r: -mass[r]):
        room = capacity - load
        if full_sims is not None:
            fits = room + 1e-9 >= mass[i]
            score = np.where(fits, full_sims[i], -np.inf)
            c = int(np.argmax(score)) if fits.any() else int(np.argmax(room))
        else:
            c = int(np.argmax(room))
        labels[i] = c
        load[c] += mass[i]
    return labels


def update_centroids(x: np.ndarray, labels: np.ndarray, previous: np.ndarray,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """Normalised (weighted) mean of each cluster's members; an empty one keeps its centre."""
    k, d = previous.shape
    w = np.ones(x.shape[0], np.float64) if weights is None else weights.astype(np.float64)
    sums = np.zeros((k, d), dtype=np.float64)
    np.add.at(sums, labels, x.astype(np.float64) * w[:, None])
    counts = np.bincount(labels, weights=w, minlength=k)
    sums[counts == 0] = previous[counts == 0]
    return normalize_rows(sums)


def balanced_kmeans(x: np.ndarray, k: int, niter: int = 20, balance_iters: int = 5,
                    seed: int = 0, slack: float = 0.02, topk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Fine clustering: spherical k-means, then balanced Lloyd rounds.

    Returns (centroids (k, d), labels (N,)) with every cluster holding at most
    ceil(N / k * (1 + slack)) points. Deterministic for a given seed.
    """
    x = normalize_rows(x)
    centroids = spherical_kmeans(x, k, niter=niter, seed=seed)
    cap = np.full(k, math.ceil(x.shape[0] / k * (1 + slack)), dtype=np.float64)
    ones = np.ones(x.shape[0], dtype=np.float64)
    labels = assign_nearest(x, centroids)
    for _ in range(balance_iters):
        sims, cand = top_candidates(x, centroids, topk)
        labels = capacity_assign(sims, cand, ones, cap)
        centroids = update_centroids(x, labels, centroids)
    return centroids, labels


def coarse_cluster(fine_centroids: np.ndarray, fine_mass: np.ndarray, n_experts: int,
                   niter: int = 20, balance_iters: int = 5, seed: int = 0,
                   slack: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Coarse clustering of fine centres into experts, balanced by data mass.

    fine_mass[s] is the number of training pairs behind fine cluster s. Each
    expert gets at most total_mass / n * (1 + slack) where the granularity of
    the fine clusters allows, and every expert gets at least one fine cluster.
    Returns (expert_centroids (n, d), expert_of_fine (m,)).
    """
    m = fine_centroids.shape[0]
    if m < n_experts:
        raise ValueError(f"{m} fine clusters cannot make {n_experts} experts")
    mass = np.maximum(fine_mass.astype(np.float64), 1e-6)
    centroids = spherical_kmeans(fine_centroids, n_experts, niter=niter, seed=seed, weights=mass)
    cap = np.full(n_experts, mass.sum() / n_experts * (1 + slack))
    expert_of_fine = assign_nearest(fine_centroids, centroids)
    for _ in range(max(1, balance_iters)):
        full = fine_centroids @ centroids.T
        cand = np.argsort(-full, axis=1)
        sims = np.take_along_axis(full, cand, axis=1)
        expert_of_fine = capacity_assign(sims, cand, mass, cap, full_sims=full)
        expert_of_fine = fill_empty(expert_of_fine, full, mass, n_experts)
        centroids = update_centroids(fine_centroids, expert_of_fine, centroids, weights=mass)
    return centroids, expert_of_fine


def fill_empty(labels: np.ndarray, sims: np.ndarray, mass: np.ndarray, k: int) -> np.ndarray:
    """Give each empty cluster the most similar member of the heaviest cluster."""
    labels = labels.copy()
    for c in range(k):
        if (labels == c).any():
            continue
        load = np.bincount(labels, weights=mass, minlength=k)
        donor = int(np.argmax(load))
        members = np.flatnonzero(labels == donor)
        if members.size < 2:
            raise ValueError("not enough fine clusters to give every expert one")
        labels[members[np.argmax(sims[members, c])]] = c
    return labels


def imbalance_factor(labels: np.ndarray, k: int, weights: np.ndarray | None = None) -> float:
    """k * sum(size^2) / N^2: 1.0 for perfect balance, k when all in one cluster.

    The same measure as faiss.contrib.clustering.imbalance_factor, with
    optional weights (data mass) per element.
    """
    sizes = np.bincount(labels, weights=weights, minlength=k).astype(np.float64)
    total = sizes.sum()
    return float(k * (sizes ** 2).sum() / total ** 2) if total else float("nan")


def inertia(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of unit rows to their assigned unit centroid."""
    diff = x - centroids[labels]
    return float((diff * diff).sum())
