"""Task metadata embedded with the clustering's caption encoder, for routing."""

from __future__ import annotations

import numpy as np

from clustering.embed import encode


def classname_embeddings(encoder, classnames: list[str], templates: list[str]) -> np.ndarray:
    """(C, d): each class name in every prompt template, embedded and averaged, unit norm.

    MoDE embeds class names with the same SimCSE model that clustered the
    captions, so they live in the space of the fine centroids.
    """
    texts = [t.format(c) for c in classnames for t in templates]
    vectors = encode(encoder, texts).reshape(len(classnames), len(templates), -1).mean(1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
