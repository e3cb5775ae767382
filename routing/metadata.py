"""Task metadata embedded with the clustering's caption encoder, for routing."""

from __future__ import annotations

import numpy as np

from clustering.encoder import encode
from routing.prompts import template_average


def classname_embeddings(encoder, classnames: list[str], templates: list[str]) -> np.ndarray:
    """(C, d): each class name in every prompt template, embedded and averaged, unit norm.

    MoDE embeds class names with the same SimCSE model that clustered the
    captions, so they live in the space of the fine centroids.
    """
    return template_average(lambda texts: encode(encoder, texts), classnames, templates)
