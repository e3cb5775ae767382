"""Class names in prompt templates, embedded and averaged: one helper for every text tower.

Both routing (the caption encoder, to compare class names with the fine
centres) and zero-shot classification (each CLIP's text tower, for its
classifier weights) embed every class name in every template and average.
The average is of unit vectors, renormalised, as open_clip's
`build_zero_shot_classifier` does, so an embedding's length never weighs a
template more than another.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# The prompt a task without its own templates is read with (CLIP's plainest), everywhere.
DEFAULT_TEMPLATES = ["a photo of a {}."]


def fill(template: str, classname: str) -> str:
    """The template with the class name in its placeholder: `{}` (moda, OpenAI) or `{c}` (clip_benchmark)."""
    return template.replace("{c}", classname) if "{c}" in template else template.format(classname)


def template_average(embed: Callable[[list[str]], np.ndarray], classnames: list[str],
                     templates: list[str]) -> np.ndarray:
    """(C, d): each class name in every template embedded (`embed` returns unit rows) and averaged,
    unit norm."""
    texts = [fill(t, c) for c in classnames for t in templates]
    vectors = embed(texts).reshape(len(classnames), len(templates), -1).mean(1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
