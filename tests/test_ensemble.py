"""Ensembling logits and the accuracy metrics."""

import numpy as np
import pytest

from routing.ensemble import (
    ensemble_logits,
    ensemble_per_query,
    mean_per_class_accuracy,
    recall_at_k,
    topk_accuracy,
)


def test_ensemble_is_the_weighted_sum_of_expert_logits():
    logits = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # 2 experts, 1 image, 2 classes
    np.testing.assert_allclose(ensemble_logits(logits, [0.75, 0.25]), [[0.75, 0.25]])


def test_ensemble_rejects_mismatched_weights():
    with pytest.raises(ValueError, match="2 experts' logits but 3 weights"):
        ensemble_logits(np.zeros((2, 1, 2)), np.ones(3) / 3)


def test_topk_accuracy():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    labels = np.array([2, 0])
    assert topk_accuracy(logits, labels, 1) == 0.5
    assert topk_accuracy(logits, labels, 2) == 1.0


def test_mean_per_class_accuracy_weights_classes_equally():
    # class 0: 3 images, all right; class 1: 1 image, wrong -> (1 + 0) / 2
    logits = np.array([[1.0, 0.0]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert mean_per_class_accuracy(logits, labels) == 0.5
    assert topk_accuracy(logits, labels, 1) == 0.75


def test_recall_at_k_matches_row_i_to_column_i():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.5, 0.4]])
    assert recall_at_k(sim, 1) == pytest.approx(1 / 3)
    assert recall_at_k(sim, 2) == pytest.approx(1.0)


def test_per_query_ensemble_mixes_each_row_with_its_own_weights():
    scores = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # 2 experts, 2 queries
    weights = np.array([[1.0, 0.0], [0.25, 0.75]])
    np.testing.assert_allclose(ensemble_per_query(scores, weights), [[1.0, 0.0], [0.25, 0.75]])
