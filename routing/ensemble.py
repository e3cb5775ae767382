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


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> np.ndarray:
    """(N,) bool: whether each row's true label is among its k highest logits (the per-sample
    record behind top-k accuracy, which paired intervals resample)."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Share of rows whose true label is among the k highest logits."""
    return float(topk_hits(logits, labels, k).mean())


def mean_per_class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy averaged over the classes present in `labels`."""
    pred = logits.argmax(axis=1)
    classes = np.unique(labels)
    return float(np.mean([(pred[labels == c] == c).mean() for c in classes]))


def ensemble_per_query(expert_scores: np.ndarray, query_weights: np.ndarray) -> np.ndarray:
    """(n_experts, Q, K) scores and (Q, n_experts) per-query weights -> (Q, K).

    Text-to-image retrieval routes every query on its own, so each row of the
    result mixes the experts with that query's weights.
    """
    if expert_scores.shape[:2] != query_weights.T.shape:
        raise ValueError(f"scores {expert_scores.shape} do not match weights {query_weights.shape}")
    return np.einsum("qc,cqk->qk", query_weights.astype(np.float64), expert_scores.astype(np.float64))


def recall_hits(similarity: np.ndarray, k: int) -> np.ndarray:
    """(rows,) bool: whether each row's matching column (row i <-> column i) is among its k highest."""
    return topk_hits(similarity, np.arange(similarity.shape[0]), k)


def recall_at_k(similarity: np.ndarray, k: int) -> float:
    """Share of rows whose matching column (row i <-> column i) is among the k highest."""
    return float(recall_hits(similarity, k).mean())
