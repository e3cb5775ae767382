"""Balanced k-means and the two-stage clustering, on small synthetic blobs."""

import numpy as np
import pytest

from clustering.kmeans import (
    assign_nearest,
    balanced_kmeans,
    capacity_assign,
    coarse_cluster,
    imbalance_factor,
    normalize_rows,
)


def blobs(n_per, centres, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(n_per), dim)) * 3 if centres is None else centres
    x = np.concatenate([means[i] + spread * rng.normal(size=(n, dim)) for i, n in enumerate(n_per)])
    return normalize_rows(x.astype(np.float32))


def test_imbalance_factor_matches_hand_computation():
    # sizes 3 and 1: k * sum(s^2) / N^2 = 2 * (9 + 1) / 16
    assert imbalance_factor(np.array([0, 0, 0, 1]), 2) == pytest.approx(1.25)
    assert imbalance_factor(np.array([0, 1, 0, 1]), 2) == pytest.approx(1.0)


def test_capacity_assign_respects_capacity_and_prefers_similarity():
    sims = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    cand = np.array([[0, 1], [0, 1], [0, 1]])
    labels = capacity_assign(sims, cand, np.ones(3), np.array([2.0, 2.0]))
    assert labels.tolist() == [0, 0, 1]  # the least similar point gives way


def test_capacity_assign_places_points_whose_candidates_are_full():
    sims = np.array([[0.9], [0.8], [0.7]])
    cand = np.array([[0], [0], [0]])
    labels = capacity_assign(sims, cand, np.ones(3), np.array([1.0, 1.0, 1.0]))
    assert sorted(labels.tolist()) == [0, 1, 2]


def test_balanced_kmeans_balances_skewed_data_for_any_n():
    x = blobs([700, 150, 100, 51], None)  # N = 1001: not a multiple of k
    centroids, labels = balanced_kmeans(x, 10, niter=10, balance_iters=4, seed=0)
    sizes = np.bincount(labels, minlength=10)
    assert sizes.sum() == 1001
    assert sizes.max() <= int(np.ceil(1001 / 10 * 1.02))
    assert imbalance_factor(labels, 10) < 1.05


def test_balanced_kmeans_is_deterministic_under_a_seed():
    x = blobs([200, 200], None)
    a = balanced_kmeans(x, 8, seed=3)
    b = balanced_kmeans(x, 8, seed=3)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0])


def test_coarse_clusters_are_balanced_by_mass_and_none_is_empty():
    rng = np.random.default_rng(1)
    fine = normalize_rows(rng.normal(size=(32, 8)).astype(np.float32))
    mass = rng.integers(50, 150, size=32)
    _, expert_of_fine = coarse_cluster(fine, mass, 4, seed=0)
    load = np.bincount(expert_of_fine, weights=mass, minlength=4)
    assert (np.bincount(expert_of_fine, minlength=4) > 0).all()
    assert load.max() / load.min() < 1.25


def test_coarse_clustering_keeps_semantic_groups_together():
    # Two well separated groups of fine centres, two experts: each group one expert.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=8), rng.normal(size=8)
    fine = normalize_rows(np.stack([a + 0.05 * rng.normal(size=8) for _ in range(6)]
                                   + [b + 0.05 * rng.normal(size=8) for _ in range(6)]).astype(np.float32))
    _, expert_of_fine = coarse_cluster(fine, np.ones(12), 2, seed=0)
    assert len(set(expert_of_fine[:6])) == 1 and len(set(expert_of_fine[6:])) == 1
    assert expert_of_fine[0] != expert_of_fine[6]


def test_assign_nearest_picks_the_most_similar_centroid():
    centroids = np.eye(3, dtype=np.float32)
    x = normalize_rows(np.array([[0.1, 0.9, 0.0], [0.0, 0.2, 0.8]], dtype=np.float32))
    assert assign_nearest(x, centroids).tolist() == [1, 2]
