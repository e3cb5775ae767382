"""Ensembling expert logits and scoring them: pure numpy.

Logits are cosine similarities between image and class-text embeddings, as
MoDE ensembles them (not softmax probabilities), so experts with different
logit scales still combine on one scale.
"""

from __future__ import annotations

import numpy as np


def ensemble_logits(expert_logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n_experts, N, C) logits and (n_experts,) weights -> (N, C) weighted sum."""
    weights = np.asarray(weights, dtype=np.float64)
    if expert_logits.shape[0] != weights.shape[0]:
        raise ValueError(f"{expert_logits.shape[0]} experts' logits but {weights.shape[0]} weights")
    return np.tensordot(weights, expert_logits.astype(np.float64), axes=1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Share of rows whose true label is among the k highest logits."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def mean_per_class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy averaged over the classes present in `labels`."""
    pred = logits.argmax(axis=1)
    classes = np.unique(labels)
    return float(np.mean([(pred[labels == c] == c).mean() for c in classes]))
