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


def text_hits(i2t: np.ndarray, caption_image: np.ndarray, k: int) -> np.ndarray:
    """(images,) bool: whether any of each image's captions is among its k most similar captions.

    i2t: (images, captions) similarities; caption_image[j]: the image caption j describes. With
    several captions per image (clip_benchmark's retrieval sets, 5 for COCO) a hit is any of them,
    as CLIP papers and clip_benchmark count recall@k.
    """
    k = min(k, i2t.shape[1])
    top = np.argsort(-i2t, axis=1, kind="stable")[:, :k]
    return (np.asarray(caption_image)[top] == np.arange(i2t.shape[0])[:, None]).any(axis=1)


def image_hits(t2i: np.ndarray, caption_image: np.ndarray, k: int) -> np.ndarray:
    """(captions,) bool: whether each caption's image is among its k most similar images."""
    return topk_hits(t2i, np.asarray(caption_image), k)
