"""Ensembling logits and the accuracy metrics."""

import numpy as np
import pytest

from routing.ensemble import ensemble_logits, mean_per_class_accuracy, topk_accuracy


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
