"""Routing weights: how much each expert is trusted on a task, from metadata alone.

MoDE routes a task by comparing its metadata (class names, embedded with the
same caption encoder as the clustering) with the fine cluster centres each
expert owns. Two formulas are in circulation and they disagree, so both are
here, selectable in the config, and both are pure functions of arrays:

`paper` (Ma et al. 2024, section 3.3):
    A[l, s] = exp(-||e_l - e_s||^2 / lambda)            lambda = 0.2
    keep only each class's nearest fine centre (top-1 filter)
    score_c = sum_l sum_{s in S_c} A[l, s]
    p(c | T) = softmax(score / temperature)
  with |L| > many_classes: lambda <- lambda / log|L| (sharper), and with
  |L| < few_classes: temperature = few_class_temperature (softer, so that
  usually two experts share a task). The paper says "soften" without a
  formula; the temperature is moda's choice and is in the config.

`released` (the public MoDE reference script): unsquared distance d_l from
each class to its nearest fine centre s(l);
    beta = 5 * log10(max(10, |L| - 200))
    a = exp(0.5 - sqrt(|L|)) if |L| < 10 else 0
    w_c = sum_{l : s(l) in S_c} exp((a - d_l) * beta)
    p = softmax(w / 8)

Ownership: S_c, the fine clusters expert c owns, is given either as the
cluster stage's `expert_of_fine` labels (m,) (every fine cluster has exactly
one owner) or as a boolean (n, m) matrix. The matrix is what an expert added
later needs: an expert split off the widest one, or one targeted at a task,
owns fine clusters that an original expert owns too, and both are scored on
them (the formulas above sum over S_c, which need not be disjoint).
"""

from __future__ import annotations

import math

import numpy as np


def squared_distances(queries: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(L, d) x (m, d) -> (L, m) squared Euclidean distances."""
    q = queries.astype(np.float64)
    c = centroids.astype(np.float64)
    d2 = (q * q).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * q @ c.T
    return np.maximum(d2, 0.0)


def ownership_matrix(ownership: np.ndarray, num_experts: int) -> np.ndarray:
    """(m,) owner labels or an (n, m) boolean matrix -> the (n, m) float matrix owns[c, s]."""
    ownership = np.asarray(ownership)
    if ownership.ndim == 1:
        return (ownership[None, :] == np.arange(num_experts)[:, None]).astype(np.float64)
    if ownership.shape[0] != num_experts:
        raise ValueError(f"ownership has {ownership.shape[0]} rows for {num_experts} experts")
    return ownership.astype(np.float64)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def paper_weights(class_embeddings: np.ndarray, fine_centroids: np.ndarray,
                  ownership: np.ndarray, num_experts: int, lam: float = 0.2,
                  few_classes: int = 10, many_classes: int = 200,
                  few_class_temperature: float = 2.0) -> np.ndarray:
    """p(c | T) with the paper's formula; returns (num_experts,) summing to 1."""
    num_classes = class_embeddings.shape[0]
    if num_classes > many_classes:
        lam = lam / math.log(num_classes)
    d2 = squared_distances(class_embeddings, fine_centroids)
    nearest = d2.argmin(axis=1)
    affinity = np.exp(-d2[np.arange(num_classes), nearest] / lam)
    scores = ownership_matrix(ownership, num_experts)[:, nearest] @ affinity
    temperature = few_class_temperature if num_classes < few_classes else 1.0
    return softmax(scores / temperature)


def released_weights(class_embeddings: np.ndarray, fine_centroids: np.ndarray,
                     ownership: np.ndarray, num_experts: int) -> np.ndarray:
    """p(c | T) with the public reference script's formula; (num_experts,) summing to 1."""
    num_classes = class_embeddings.shape[0]
    d = np.sqrt(squared_distances(class_embeddings, fine_centroids))
    nearest = d.argmin(axis=1)
    d_nearest = d[np.arange(num_classes), nearest]
    beta = 5.0 * math.log10(max(10, num_classes - 200))
    a = math.exp(0.5 - math.sqrt(num_classes)) if num_classes < 10 else 0.0
    w = ownership_matrix(ownership, num_experts)[:, nearest] @ np.exp((a - d_nearest) * beta)
    return softmax(w / 8.0)


def route(variant: str, class_embeddings: np.ndarray, fine_centroids: np.ndarray,
          ownership: np.ndarray, num_experts: int, lam: float = 0.2) -> np.ndarray:
    """Dispatch on the config's `evaluate.routing`; `ownership` as in the module docstring."""
    if variant == "paper":
        return paper_weights(class_embeddings, fine_centroids, ownership, num_experts, lam=lam)
    if variant == "released":
        return released_weights(class_embeddings, fine_centroids, ownership, num_experts)
    raise ValueError(f"unknown routing variant {variant!r}; use 'paper' or 'released'")


def route_each(variant: str, queries: np.ndarray, fine_centroids: np.ndarray,
               ownership: np.ndarray, num_experts: int, lam: float = 0.2) -> np.ndarray:
    """One weight vector per query, each query its own task: (Q, d) -> (Q, num_experts).

    The paper's text-to-image retrieval routing: p(c | T_q) from A[q, s] alone.
    """
    return np.stack([route(variant, q[None, :], fine_centroids, ownership, num_experts, lam)
                     for q in queries]) if len(queries) else np.zeros((0, num_experts))


def nearest_fine(queries: np.ndarray, fine_centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's nearest fine centre and its (unsquared) distance, for the routing log."""
    d2 = squared_distances(queries, fine_centroids)
    nearest = d2.argmin(axis=1)
    return nearest, np.sqrt(d2[np.arange(len(queries)), nearest])
