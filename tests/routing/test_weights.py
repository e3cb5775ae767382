"""Routing weights against numbers computed by hand."""

import math

import numpy as np
import pytest

from routing.weights import paper_weights, released_weights, route, squared_distances

# Two experts; fine centres 0,1 belong to expert 0 and centre 2 to expert 1.
FINE = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
EXPERT_OF_FINE = np.array([0, 0, 1])


def test_squared_distances():
    d2 = squared_distances(np.array([[1.0, 0.0]]), FINE)
    np.testing.assert_allclose(d2, [[0.0, 2.0, 4.0]], atol=1e-12)


def test_paper_weights_few_classes_by_hand():
    # Classes at (1,0) and (-1,0): each sits on one fine centre, d^2 = 0, A = 1.
    # scores = [1, 1] -> equal weights whatever the temperature.
    classes = np.array([[1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_allclose(paper_weights(classes, FINE, EXPERT_OF_FINE, 2), [0.5, 0.5])


def test_paper_weights_use_only_each_class_nearest_centre():
    # One class at (0.6, 0.8): nearest centre is (0,1) with d^2 = 0.36+0.04 = 0.4;
    # A = exp(-0.4/0.2) = e^-2 goes to expert 0 only (top-1 filter), expert 1 gets 0.
    # |L| = 1 < 10 -> temperature 2: p0 = e^(e^-2/2) / (e^(e^-2/2) + 1).
    p = paper_weights(np.array([[0.6, 0.8]]), FINE, EXPERT_OF_FINE, 2)
    z = math.exp(math.exp(-2) / 2)
    np.testing.assert_allclose(p, [z / (z + 1), 1 / (z + 1)])


def test_paper_weights_many_classes_sharpen_lambda():
    # 300 classes at distance^2 0.04 from centre 0: lambda = 0.2 / ln 300,
    # A = exp(-0.04 * ln(300) / 0.2) = 300^-0.2 each, score0 = 300 * 300^-0.2.
    classes = np.tile([[0.8, 0.0]], (300, 1))
    p = paper_weights(classes, FINE, EXPERT_OF_FINE, 2)
    score = 300 * 300 ** -0.2
    np.testing.assert_allclose(p, [1 / (1 + math.exp(-score)), math.exp(-score) / (1 + math.exp(-score))])


def test_released_weights_few_classes_by_hand():
    # One class at (1,0): d = 0 to centre 0 (expert 0). |L| = 1:
    # beta = 5*log10(10) = 5, a = exp(0.5 - 1), w0 = exp(a * 5), w1 = 0; p = softmax(w / 8).
    p = released_weights(np.array([[1.0, 0.0]]), FINE, EXPERT_OF_FINE, 2)
    w0 = math.exp(math.exp(-0.5) * 5)
    e0, e1 = math.exp(w0 / 8), 1.0
    np.testing.assert_allclose(p, [e0 / (e0 + e1), e1 / (e0 + e1)])


def test_released_weights_many_classes_by_hand():
    # 300 classes at (-0.5, 0): nearest centre 2 (expert 1), d = 0.5. beta = 5*log10(100) = 10,
    # a = 0: w1 = 300 * exp(-5), w0 = 0.
    classes = np.tile([[-0.5, 0.0]], (300, 1))
    p = released_weights(classes, FINE, EXPERT_OF_FINE, 2)
    w1 = 300 * math.exp(-5)
    e1 = math.exp(w1 / 8)
    np.testing.assert_allclose(p, [1 / (1 + e1), e1 / (1 + e1)])


def test_route_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown routing variant"):
        route("oracle", FINE, FINE, EXPERT_OF_FINE, 2)


def test_weights_sum_to_one_and_favour_the_expert_owning_the_classes():
    classes = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.3]])
    for variant in ("paper", "released"):
        p = route(variant, classes, FINE, EXPERT_OF_FINE, 2)
        assert p.sum() == pytest.approx(1.0)
        assert p[0] > p[1]
