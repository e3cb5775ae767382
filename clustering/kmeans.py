"""Balanced spherical k-means and the two-stage MoDE clustering, as pure functions.

Everything here takes and returns numpy arrays; no files, no Prefect.

Why balanced: MoDE trains one expert per cluster, so a cluster that swallows
most of the data makes one expert do most of the work (the reference code's
plain coarse argmin gave 170M vs 230M pairs for two experts, and a plain
k-means of fine centres can leave experts empty).

Fine clusters (many unit-mass points, k up to thousands): `niter` Lloyd
iterations in all, the first `niter - balance_iters` plain FAISS spherical
k-means and the last `balance_iters` balanced: each balanced iteration
assigns points under a capacity of ceil(N / k * (1 + slack)) per centre and
moves the centres to their members' normalised means.

The balanced assignment is point-proposing deferred acceptance (Gale-Shapley)
on each point's `topk` most similar centres: every unplaced point proposes to
its next candidate, each centre keeps its `capacity` most similar proposers
and current members and rejects the rest, who propose again. Why this one:
- It is exact about capacity and needs no divisibility (the reference
  auction with floor(N/m) cannot terminate when m does not divide N).
- The result is stable: no point and centre both prefer each other to what
  they hold, the discrete analogue of "each point as close as capacity allows".
- Every round is a few vectorised numpy sorts over the proposers, so it runs
  at FAISS speed (Sinkhorn needs dense N x k matrices; a per-pair Python loop
  does not finish at 200k x 1024).
- Deterministic: ties break on point index.
Points whose `topk` candidates all filled up are placed by a new round over
the centres that still have room (capacities sum to at least N, so this ends).

Coarse clusters (m fine centres, weighted by data mass, n experts): a greedy
capacity fill over the full similarity matrix, then `even_out` moves boundary
fine clusters from the heaviest to the lightest expert until the expert sizes
are within `max_ratio` of each other.
"""

from __future__ import annotations

import math

import numpy as np

from clustering.search import CentreSearch, use_gpu


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def spherical_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """Plain FAISS spherical k-means: (N, d) unit rows -> (k, d) unit centroids.

    FAISS subsamples above 256 points per centroid; we lift that cap so every
    point given here is used (the caller decides the sample).
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise ValueError(f"cannot fit {k} clusters to {x.shape[0]} points")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=use_gpu(),
                      max_points_per_centroid=max(256, math.ceil(x.shape[0] / k)))
    km.train(x, weights=None if weights is None else np.ascontiguousarray(weights, np.float32))
    return normalize_rows(km.centroids)


def top_candidates(x: np.ndarray, centroids: np.ndarray, topk: int,
                   device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Inner products and indices of each row's `topk` most similar centroids, best first."""
    return CentreSearch(centroids, device).top(x, topk)


def assign_nearest(x: np.ndarray, centroids: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Index of each row's most similar centroid (inner product on unit vectors)."""
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    _, idx = top_candidates(x, centroids, 1, device)
    return idx[:, 0]


def deferred_acceptance(sims: np.ndarray, cand: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Point-proposing deferred acceptance with integer capacities.

    sims, cand: (N, t) similarities and centre indices of each point's
    candidates, best first. capacity: (k,) how many points each centre takes.
    Returns (N,) centre per point, -1 for a point all of whose candidates
    ended full. Deterministic: equal similarities favour the lower point index.
    """
    n, t = cand.shape
    k = capacity.shape[0]
    capacity = capacity.astype(np.int64)
    labels = np.full(n, -1, dtype=np.int64)
    held_sim = np.full(n, -np.inf, dtype=np.float64)
    pointer = np.zeros(n, dtype=np.int64)
    proposers = np.arange(n) if t else np.zeros(0, np.int64)
    while proposers.size:
        choice = pointer[proposers]
        centre = cand[proposers, choice]
        score = sims[proposers, choice].astype(np.float64)
        pointer[proposers] += 1
        touched = np.zeros(k, dtype=bool)
        touched[centre] = True
        held = np.flatnonzero(labels >= 0)
        holders = held[touched[labels[held]]]
        points = np.concatenate([holders, proposers])
        centres = np.concatenate([labels[holders], centre])
        scores = np.concatenate([held_sim[holders], score])
        order = np.lexsort((points, -scores, centres))
        points, centres, scores = points[order], centres[order], scores[order]
        rank = np.arange(points.size) - np.searchsorted(centres, centres, side="left")
        keep = rank < capacity[centres]
        labels[points[keep]] = centres[keep]
        held_sim[points[keep]] = scores[keep]
        rejected = points[~keep]
        labels[rejected] = -1
        held_sim[rejected] = -np.inf
        proposers = rejected[pointer[rejected] < t]
    return labels


def balanced_assign(x: np.ndarray, centroids: np.ndarray, capacity: np.ndarray, topk: int = 8,
                    search: CentreSearch | None = None) -> np.ndarray:
    """Every row to a centre, no centre above its integer capacity (sum >= N).

    Deferred acceptance on the `topk` nearest centres; points left over go
    through another round restricted to the centres with room left.
    """
    n, k = x.shape[0], centroids.shape[0]
    capacity = capacity.astype(np.int64)
    if capacity.sum() < n:
        raise ValueError(f"capacities sum to {capacity.sum()}, fewer than the {n} points")
    labels = np.full(n, -1, dtype=np.int64)
    left = np.arange(n)
    open_centres = np.arange(k)
    room = capacity.copy()
    search = search or CentreSearch(centroids)
    while left.size:
        sims, idx = search.top(x[left], topk, None if open_centres.size == k else open_centres)
        placed = deferred_acceptance(sims, idx, room)
        labels[left] = placed
        room = capacity - np.bincount(labels[labels >= 0], minlength=k)
        left = np.flatnonzero(labels < 0)
        open_centres = np.flatnonzero(room > 0)
    return labels


def update_centroids(x: np.ndarray, labels: np.ndarray, previous: np.ndarray,
                     weights: np.ndarray | None = None) -> np.ndarray:
    """Normalised (weighted) mean of each cluster's members; an empty one keeps its centre.

    Sums with torch's index_add_ (multi-threaded, no copy of x): np.add.at is
    an unbuffered per-element loop, ~40x slower at 200k x 384.
    """
    import torch

    k, d = previous.shape
    rows = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if weights is not None:
        rows = rows * torch.from_numpy(np.asarray(weights, dtype=np.float32))[:, None]
    index = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    sums = torch.zeros(k, d, dtype=torch.float32).index_add_(0, index, rows).numpy()
    empty = np.bincount(labels, minlength=k) == 0
    sums[empty] = previous[empty]
    return normalize_rows(sums)


def balanced_kmeans(x: np.ndarray, k: int, niter: int = 20, balance_iters: int = 8,
                    seed: int = 0, slack: float = 0.05, topk: int = 8, device: str = "cpu",
                    engine: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Fine clustering: `niter` spherical Lloyd iterations, the last `balance_iters` balanced.

    Returns (centroids (k, d), labels (N,)): every cluster holds at most
    ceil(N / k * (1 + slack)) points (balance_iters = 0: plain k-means) and each centroid is its members'
    normalised mean. Deterministic for a given seed. The balanced iterations' candidate search runs
    on `device` (CentreSearch: torch on a GPU, FAISS on a CPU).
    """
    x = normalize_rows(x)
    balance_iters = min(balance_iters, niter - 1)
    centroids = spherical_kmeans(x, k, niter=niter - max(0, balance_iters), seed=seed)
    if balance_iters <= 0:  # plain spherical k-means (the unbalanced peer)
        return centroids, CentreSearch(centroids, device, engine).top(x, 1)[1][:, 0]
    capacity = np.full(k, math.ceil(x.shape[0] / k * (1 + slack)), dtype=np.int64)
    labels = np.zeros(x.shape[0], dtype=np.int64)
    for _ in range(balance_iters):
        search = CentreSearch(centroids, device, engine)  # the centres of this iteration, uploaded once
        labels = fill_empty_clusters(x, centroids, balanced_assign(x, centroids, capacity, topk, search))
        centroids = update_centroids(x, labels, centroids)
    return centroids, labels


def fill_empty_clusters(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Give every empty cluster the point, of the largest cluster, most similar to its centre.

    The balanced assignment bounds clusters from above only, so a centre nobody
    prefers can end empty; an empty fine cluster owns no data and routes nothing.
    """
    labels = labels.copy()
    k = centroids.shape[0]
    sizes = np.bincount(labels, minlength=k)
    for empty in np.flatnonzero(sizes == 0).tolist():
        donor = int(np.argmax(sizes))
        if sizes[donor] < 2:
            break  # fewer points than clusters: nothing to give
        members = np.flatnonzero(labels == donor)
        chosen = members[int(np.argmax(x[members] @ centroids[empty]))]
        labels[chosen] = empty
        sizes[donor] -= 1
        sizes[empty] += 1
    return labels


def capacity_assign(sims: np.ndarray, cand: np.ndarray, mass: np.ndarray,
                    capacity: np.ndarray, full_sims: np.ndarray | None = None) -> np.ndarray:
    """Greedy capacity-constrained assignment for weighted points (the coarse step).

    sims, cand: (N, t) candidate similarities and centre indices per point.
    mass: (N,) how much of a centre's capacity each point uses (the number of
    training pairs behind a fine cluster). capacity: (k,) room per centre;
    must sum to at least mass.sum(). Pairs are visited once in order of
    decreasing similarity and a point takes the first centre with room; a
    point whose candidates are all full goes to the most similar centre with
    room (`full_sims`, (N, k)) or, without it, the one with most room.
    Returns (N,) centre index per point. A Python loop over N x t pairs: for
    the m x n coarse problem (1024 x 32 at most), not for samples.
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


def even_out(labels: np.ndarray, sims: np.ndarray, mass: np.ndarray, k: int,
             max_ratio: float) -> np.ndarray:
    """Move fine clusters from the heaviest to the lightest expert until max/min <= max_ratio.

    Each move takes the heaviest expert's fine cluster that fits the lightest
    best relative to where it is (largest sims[s, light] - sims[s, heavy]),
    and only one lighter than the gap, so the sum of squared loads drops at
    every move and the loop ends. Stops early when no fine cluster is light
    enough (the granularity of the fine clusters is then the limit).
    """
    labels = labels.copy()
    load = np.bincount(labels, weights=mass, minlength=k).astype(np.float64)
    for _ in range(labels.size * k):
        heavy, light = int(np.argmax(load)), int(np.argmin(load))
        if load[heavy] <= max_ratio * load[light]:
            break
        members = np.flatnonzero(labels == heavy)
        movable = members[mass[members] < load[heavy] - load[light]] if members.size > 1 else members[:0]
        if not movable.size:
            break
        best = int(movable[np.argmax(sims[movable, light] - sims[movable, heavy])])
        labels[best] = light
        load[heavy] -= mass[best]
        load[light] += mass[best]
    return labels


def coarse_cluster(fine_centroids: np.ndarray, fine_mass: np.ndarray, n_experts: int,
                   niter: int = 20, balance_iters: int = 5, seed: int = 0,
                   slack: float = 0.02, max_ratio: float = 1.05) -> tuple[np.ndarray, np.ndarray]:
    """Coarse clustering of fine centres into experts, balanced by data mass.

    fine_mass[s] is the number of training pairs behind fine cluster s. Each
    balanced round fills experts up to total_mass / n * (1 + slack) in order
    of similarity, evens the loads out to within `max_ratio` (where the
    granularity of the fine clusters allows) and moves each expert centre to
    its fine centres' mass-weighted mean. Every expert gets at least one fine
    cluster. Returns (expert_centroids (n, d), expert_of_fine (m,)).
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
        cand = np.argsort(-full, axis=1, kind="stable")
        sims = np.take_along_axis(full, cand, axis=1)
        expert_of_fine = capacity_assign(sims, cand, mass, cap, full_sims=full)
        expert_of_fine = fill_empty(expert_of_fine, full, mass, n_experts)
        expert_of_fine = even_out(expert_of_fine, full, mass, n_experts, max_ratio)
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


def spread(fine_centroids: np.ndarray, expert_of_fine: np.ndarray, expert_centroids: np.ndarray) -> np.ndarray:
    """(n,) mean distance of each expert's fine centres to its coarse centre.

    The paper's order of training priority when adding experts (section 5.5):
    the widest expert first.
    """
    dist = np.linalg.norm(fine_centroids - expert_centroids[expert_of_fine], axis=1)
    n = expert_centroids.shape[0]
    counts = np.bincount(expert_of_fine, minlength=n)
    return np.bincount(expert_of_fine, weights=dist, minlength=n) / np.maximum(counts, 1)


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
