"""Balanced k-means and the two-stage clustering, on small synthetic blobs."""

import numpy as np
import pytest

from clustering.kmeans import (
    assign_nearest,
    balanced_assign,
    balanced_kmeans,
    capacity_assign,
    coarse_cluster,
    deferred_acceptance,
    even_out,
    imbalance_factor,
    inertia,
    normalize_rows,
    spread,
    update_centroids,
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
    assert sizes.max() <= int(np.ceil(1001 / 10 * 1.05))  # default slack 0.05
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


def test_deferred_acceptance_bumps_the_weaker_member():
    # Point 0 takes centre 0 first; point 1 is closer to centre 0 and bumps it
    # in round two, so point 0 falls back to its second choice.
    sims = np.array([[0.6, 0.5], [0.9, 0.1]])
    cand = np.array([[0, 1], [0, 1]])
    assert deferred_acceptance(sims, cand, np.array([1, 1])).tolist() == [1, 0]


def test_deferred_acceptance_marks_points_whose_candidates_all_filled():
    sims = np.array([[0.9], [0.8], [0.7]])
    cand = np.array([[0], [0], [0]])
    assert deferred_acceptance(sims, cand, np.array([2, 5])).tolist() == [0, 0, -1]


def test_deferred_acceptance_breaks_ties_on_point_index():
    sims = np.array([[0.5], [0.5], [0.5]])
    cand = np.zeros((3, 1), dtype=np.int64)
    assert deferred_acceptance(sims, cand, np.array([2])).tolist() == [0, 0, -1]


def test_balanced_assignment_is_a_stable_matching():
    # No point and centre would both rather be together than with what they hold.
    rng = np.random.default_rng(4)
    x = normalize_rows(rng.normal(size=(203, 6)).astype(np.float32))
    centroids = normalize_rows(rng.normal(size=(7, 6)).astype(np.float32))
    capacity = np.full(7, 30)
    labels = balanced_assign(x, centroids, capacity, topk=7)
    sims = x @ centroids.T
    own = sims[np.arange(len(x)), labels]
    worst_member = np.array([sims[labels == c, c].min(initial=np.inf) for c in range(7)])
    full = np.bincount(labels, minlength=7) >= capacity
    for i in range(len(x)):
        better = sims[i] > own[i] + 1e-6
        assert not (better & (~full | (sims[i] > worst_member + 1e-6))).any()


@pytest.mark.parametrize("n,k", [(1001, 10), (997, 64), (64, 64), (500, 7)])
def test_balanced_assignment_fills_every_point_within_capacity_for_any_n(n, k):
    rng = np.random.default_rng(n)
    x = blobs([n - n // 3, n // 3], None, seed=n)  # skewed: two blobs, k centres
    centroids = normalize_rows(rng.normal(size=(k, 16)).astype(np.float32))
    capacity = np.full(k, int(np.ceil(n / k)))
    labels = balanced_assign(x, centroids, capacity, topk=3)
    assert (labels >= 0).all()
    assert np.bincount(labels, minlength=k).max() <= capacity[0]


def test_balanced_assignment_rejects_capacities_below_the_point_count():
    x = normalize_rows(np.ones((5, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="fewer than the 5 points"):
        balanced_assign(x, np.eye(2, dtype=np.float32), np.array([2, 2]))


def test_update_centroids_is_the_normalised_weighted_mean_and_keeps_empty_ones():
    x = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    previous = np.array([[0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
    out = update_centroids(x, np.array([0, 0, 1]), previous, weights=np.array([3.0, 1.0, 1.0]))
    np.testing.assert_allclose(out[0], np.array([3, 1]) / np.sqrt(10), rtol=1e-6)
    np.testing.assert_allclose(out[1], [1, 0])
    np.testing.assert_allclose(out[2], [0.6, 0.8])


def test_balanced_kmeans_inertia_stays_close_to_plain_kmeans_on_mild_data():
    # Equal-sized well spread blobs: balancing should cost almost nothing.
    x = blobs([150] * 8, None, dim=16, spread=0.5, seed=5)
    plain_c, plain_l = balanced_kmeans(x, 16, niter=20, balance_iters=0, seed=0)
    bal_c, bal_l = balanced_kmeans(x, 16, niter=20, seed=0)
    assert imbalance_factor(bal_l, 16) <= 1.05
    assert inertia(x, bal_c, bal_l) <= 1.03 * inertia(x, plain_c, plain_l)


def test_even_out_moves_boundary_clusters_until_loads_are_within_ratio():
    sims = np.array([[0.9, 0.1], [0.8, 0.3], [0.7, 0.6], [0.2, 0.9]])
    labels = even_out(np.array([0, 0, 0, 1]), sims, np.ones(4), 2, max_ratio=1.0)
    assert labels.tolist() == [0, 0, 1, 1]  # the one closest to expert 1 moved


@pytest.mark.parametrize("n_experts", [2, 4, 8, 16, 32])
def test_coarse_experts_are_within_ten_percent_at_paper_scale(n_experts):
    rng = np.random.default_rng(n_experts)
    fine = normalize_rows(rng.normal(size=(1024, 32)).astype(np.float32))
    mass = rng.integers(100, 300, size=1024)  # unequal data behind each fine cluster
    _, expert_of_fine = coarse_cluster(fine, mass, n_experts, seed=0)
    load = np.bincount(expert_of_fine, weights=mass, minlength=n_experts)
    assert load.max() / load.min() <= 1.10


def test_spread_is_the_mean_distance_of_fine_centres_to_their_expert_centre():
    fine = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    experts = np.array([[1, 0], [1, 0]], dtype=np.float32)
    np.testing.assert_allclose(spread(fine, np.array([0, 0, 1]), experts), [np.sqrt(2) / 2, 0.0])


def test_an_empty_cluster_gets_the_largest_clusters_point_nearest_its_centre():
    from clustering.kmeans import fill_empty_clusters

    x = normalize_rows(np.array([[1, 0], [0.9, 0.1], [0.8, 0.6], [0, 1]], np.float32))
    centroids = normalize_rows(np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32))
    labels = fill_empty_clusters(x, centroids, np.array([0, 0, 0, 1]))
    assert labels.tolist() == [0, 0, 2, 1]  # point 2 is the nearest of cluster 0's to centre 2


def test_balanced_kmeans_leaves_no_cluster_empty():
    rng = np.random.default_rng(3)
    x = normalize_rows(np.concatenate([rng.normal(size=(300, 8)) + 6, rng.normal(size=(20, 8))]).astype(np.float32))
    _, labels = balanced_kmeans(x, 40, niter=6, balance_iters=3, seed=0)
    assert np.bincount(labels, minlength=40).min() >= 1


def test_the_torch_search_finds_the_candidates_faiss_finds():
    from clustering.search import CentreSearch

    rng = np.random.default_rng(4)
    x = normalize_rows(rng.normal(size=(5000, 32)).astype(np.float32))
    centres = normalize_rows(rng.normal(size=(64, 32)).astype(np.float32))
    CentreSearch.CHUNK = 777  # several chunks, the last one short
    faiss_sims, faiss_idx = CentreSearch(centres, engine="faiss").top(x, 8)
    torch_search = CentreSearch(centres, engine="torch")
    torch_sims, torch_idx = torch_search.top(x, 8)
    assert torch_search.engine == "torch" and CentreSearch(centres).engine == "faiss"  # auto on a CPU
    np.testing.assert_array_equal(torch_idx, faiss_idx)
    np.testing.assert_allclose(torch_sims, faiss_sims, atol=1e-5)
    columns = np.array([3, 10, 11, 40, 63])  # a restricted round of the balanced assignment
    _, sub_idx = torch_search.top(x, 2, columns)
    np.testing.assert_array_equal(sub_idx, CentreSearch(centres, engine="faiss").top(x, 2, columns)[1])
    assert set(np.unique(sub_idx)) <= set(columns.tolist())


def test_balanced_kmeans_on_the_torch_path_gives_the_cpu_path_assignments():
    x = blobs([900, 500, 300, 100], None, seed=5)
    faiss_centres, faiss_labels = balanced_kmeans(x, 16, niter=10, balance_iters=4, seed=1, engine="faiss")
    torch_centres, torch_labels = balanced_kmeans(x, 16, niter=10, balance_iters=4, seed=1, engine="torch")
    np.testing.assert_array_equal(torch_labels, faiss_labels)
    np.testing.assert_allclose(torch_centres, faiss_centres, atol=1e-6)
