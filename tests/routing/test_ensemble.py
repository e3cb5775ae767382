"""Ensembling logits and the accuracy metrics."""

import numpy as np
import pytest

from routing.ensemble import (
    ensemble_logits,
    ensemble_per_query,
    image_hits,
    mean_per_class_accuracy,
    text_hits,
    topk_accuracy,
)
from routing.systems import TaskView, single


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


def test_recall_at_k_matches_row_i_to_column_i_with_one_caption_per_image():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.0, 0.5, 0.4]])
    own = np.arange(3)
    assert text_hits(sim, own, 1).mean() == pytest.approx(1 / 3)
    assert text_hits(sim, own, 2).mean() == pytest.approx(1.0)
    assert image_hits(sim.T, own, 1).tolist() == [True, True, True]


def test_with_several_captions_an_image_hits_when_any_of_its_captions_is_in_the_top_k():
    # 2 images, 4 captions: captions 0, 1 describe image 0; captions 2, 3 image 1
    caption_image = np.array([0, 0, 1, 1])
    i2t = np.array([[0.1, 0.9, 0.2, 0.3],    # image 0: its caption 1 first -> hit at 1
                    [0.8, 0.1, 0.25, 0.7]])  # image 1: caption 0 (not its own), then its caption 3
    assert text_hits(i2t, caption_image, 1).tolist() == [True, False]
    assert text_hits(i2t, caption_image, 2).tolist() == [True, True]
    # text to image: each caption's hit is its own image ranked first
    assert image_hits(i2t.T, caption_image, 1).tolist() == [False, True, True, True]


def test_top5_is_left_out_below_five_classes_where_it_would_read_100_percent():
    labels = np.array([0, 1, 2])
    few = single(TaskView("t", "classification", labels), np.eye(3)[[1, 2, 0]])[0]
    assert few["top1"] == 0.0 and few["top5"] is None
    many = single(TaskView("t", "classification", labels), np.eye(5)[[1, 2, 0]])[0]
    assert many["top5"] == 1.0


def test_retrieval_reports_recall_at_1_5_and_10_both_ways():
    sim = np.eye(12)
    metrics = single(TaskView("r", "retrieval", np.zeros(0, np.int64)), sim)[0]
    assert set(metrics) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in metrics.values())


def test_per_query_ensemble_mixes_each_row_with_its_own_weights():
    scores = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # 2 experts, 2 queries
    weights = np.array([[1.0, 0.0], [0.25, 0.75]])
    np.testing.assert_allclose(ensemble_per_query(scores, weights), [[1.0, 0.0], [0.25, 0.75]])
