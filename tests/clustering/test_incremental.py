"""Which fine clusters a new expert owns, and routing with shared fine clusters (hand-made data)."""

import numpy as np
import pytest

from clustering.incremental import covering_fine_clusters, task_fine_clusters, widest_expert, widest_part
from routing.weights import ownership_matrix, paper_weights, released_weights


def unit(*rows):
    x = np.array(rows, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_widest_expert_has_the_largest_spread():
    assert widest_expert(np.array([0.1, 0.4, 0.2])) == 1


def test_the_widest_expert_is_cut_into_two_halves_and_the_wider_one_is_returned():
    # Fine clusters 0-3 of one expert: 0 and 1 almost coincide (a tight half),
    # 2 and 3 lie far apart from each other (a wide half). 4 belongs to another expert.
    fine = unit([1, 0.01, 0], [1, -0.01, 0], [0, 1, 0.8], [0, 1, -0.8], [0, 0, 1])
    part = widest_part(fine, np.array([0, 1, 2, 3]), mass=np.ones(5), seed=0)
    assert part.tolist() == [2, 3]


def test_an_expert_with_one_fine_cluster_cannot_be_split():
    with pytest.raises(ValueError, match="cannot be split"):
        widest_part(unit([1, 0]), np.array([0]), mass=np.ones(1))


def test_a_task_expert_owns_each_class_nearest_fine_clusters():
    fine = unit([1, 0], [0.9, 0.1], [0, 1], [-1, 0])
    classes = unit([1, 0.05], [0.05, 1])
    assert task_fine_clusters(classes, fine, 1).tolist() == [0, 2]
    assert task_fine_clusters(classes, fine, 2).tolist() == [0, 1, 2]  # class 2's second is 1 too


def test_new_data_owns_the_fewest_fine_clusters_that_cover_the_share():
    counts = np.array([5, 60, 0, 30, 5])
    assert covering_fine_clusters(counts, 0.9).tolist() == [1, 3]
    assert covering_fine_clusters(counts, 0.91).tolist() == [0, 1, 3]  # ties: lower id first
    assert covering_fine_clusters(counts, 1.0).tolist() == [0, 1, 3, 4]


def test_owner_labels_and_the_ownership_matrix_route_the_same():
    fine = unit([1, 0], [0, 1], [-1, 0])
    classes = unit([0.6, 0.8], [-1, 0.1])
    labels = np.array([0, 0, 1])
    matrix = np.array([[True, True, False], [False, False, True]])
    np.testing.assert_allclose(paper_weights(classes, fine, labels, 2), paper_weights(classes, fine, matrix, 2))
    np.testing.assert_allclose(released_weights(classes, fine, labels, 2),
                               released_weights(classes, fine, matrix, 2))


def test_an_added_expert_sharing_a_fine_cluster_gets_that_cluster_affinity_too():
    # One class sitting on fine centre 2 (d^2 = 0, A = 1). Experts 1 and 2 both own it:
    # scores [0, 1, 1], |L| = 1 -> temperature 2: p = e^(s/2) / sum.
    fine = unit([1, 0], [0, 1], [-1, 0])
    owns = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=bool)
    p = paper_weights(unit([-1, 0]), fine, owns, 3)
    z = np.exp(np.array([0.0, 0.5, 0.5]))
    np.testing.assert_allclose(p, z / z.sum())


def test_an_ownership_matrix_must_have_one_row_per_expert():
    with pytest.raises(ValueError, match="3 rows for 2 experts"):
        ownership_matrix(np.zeros((3, 4), dtype=bool), 2)
