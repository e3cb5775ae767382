"""A toy task whose right expert is known: routing must find it and pay off."""

import numpy as np

from routing.ensemble import ensemble_logits, topk_accuracy
from routing.weights import route


def toy(seed=0, n_images=200, n_classes=5):
    rng = np.random.default_rng(seed)
    # Fine centres in two separated regions: 0-3 belong to expert 0, 4-7 to expert 1.
    base = np.zeros((8, 16))
    base[:4, 0], base[4:, 1] = 1.0, 1.0
    fine = base + 0.1 * rng.normal(size=(8, 16))
    fine /= np.linalg.norm(fine, axis=1, keepdims=True)
    expert_of_fine = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # The task's class names embed next to expert 1's fine centres.
    classes = fine[4 + rng.integers(4, size=n_classes)] + 0.05 * rng.normal(size=(n_classes, 16))
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    labels = rng.integers(n_classes, size=n_images)
    # Expert 1 knows the domain (its logits favour the true class); expert 0 guesses.
    knows = rng.normal(size=(n_images, n_classes)) * 0.1
    knows[np.arange(n_images), labels] += 0.15
    guesses = rng.normal(size=(n_images, n_classes)) * 0.3
    return classes, fine, expert_of_fine, labels, np.stack([guesses, knows])


def test_routing_gives_the_domain_expert_the_largest_weight():
    classes, fine, expert_of_fine, _, _ = toy()
    for variant in ("paper", "released"):
        weights = route(variant, classes, fine, expert_of_fine, 2)
        assert weights.argmax() == 1, variant


def test_routed_ensemble_beats_the_uniform_one_on_the_toy_task():
    classes, fine, expert_of_fine, labels, logits = toy()
    for variant in ("paper", "released"):
        weights = route(variant, classes, fine, expert_of_fine, 2)
        routed = topk_accuracy(ensemble_logits(logits, weights), labels)
        uniform = topk_accuracy(ensemble_logits(logits, np.array([0.5, 0.5])), labels)
        assert routed > uniform, (variant, routed, uniform)
