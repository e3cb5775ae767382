"""Which fine clusters a new expert owns: the three ways to add an expert later.

Pure functions of arrays (no files); pipelines/run/add_expert.py does the I/O. Each
returns S_new, the sorted fine-cluster ids the new expert is trained on (for
`widest_part` and `task_fine_clusters`) or routed by (`covering_fine_clusters`
for new data), always a subset of the m existing fine clusters: the fine
centroids never move, so the existing experts and their routing stay as
they are.

- widest_part: MoDE section 5.5 orders experts by spread, the mean distance of
  their fine centres to their coarse centre, and trains the widest first; the
  widest expert is the one that gains most from a second specialist. Its fine
  centres are cut in two (the same mass-balanced coarse clustering the
  cluster stage uses) and the wider half becomes the new expert.
- task_fine_clusters: the paper's retrieval-enhanced variant: the nearest fine
  clusters of each of a task's class names.
- covering_fine_clusters: new data, assigned to the existing fine centres,
  fills some of them; the new expert owns the fewest fine clusters that hold
  `coverage` of its samples.
"""

from __future__ import annotations

import numpy as np

from clustering.kmeans import coarse_cluster, spread


def widest_expert(expert_spread: np.ndarray) -> int:
    """The expert whose fine centres lie farthest from its coarse centre (first on ties)."""
    return int(np.argmax(np.asarray(expert_spread)))


def widest_part(fine_centroids: np.ndarray, fine_ids: np.ndarray, mass: np.ndarray,
                seed: int = 0) -> np.ndarray:
    """Cut one expert's fine clusters `fine_ids` in two by mass; return the wider half (sorted ids).

    fine_centroids: (m, d) unit rows; mass: (m,) samples behind each fine cluster.
    """
    fine_ids = np.asarray(fine_ids)
    if fine_ids.size < 2:
        raise ValueError(f"an expert with {fine_ids.size} fine cluster(s) cannot be split; "
                         "raise cluster.num_fine or add an expert another way")
    centres = fine_centroids[fine_ids]
    halves_centroids, half_of = coarse_cluster(centres, mass[fine_ids], 2, seed=seed)
    widths = spread(centres, half_of, halves_centroids)
    return np.sort(fine_ids[half_of == int(np.argmax(widths))])


def task_fine_clusters(class_embeddings: np.ndarray, fine_centroids: np.ndarray,
                       per_class: int) -> np.ndarray:
    """The union over classes of each class's `per_class` nearest fine clusters (sorted ids).

    class_embeddings: (L, d) and fine_centroids (m, d), both unit rows, so the
    nearest centre is the most similar one.
    """
    if per_class < 1:
        raise ValueError("per_class must be at least 1")
    sims = class_embeddings @ fine_centroids.T
    k = min(per_class, fine_centroids.shape[0])
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.unique(nearest)


def covering_fine_clusters(fine_counts: np.ndarray, coverage: float) -> np.ndarray:
    """The fewest fine clusters (largest first) holding at least `coverage` of the samples (sorted ids).

    fine_counts: (m,) new samples per fine cluster.
    """
    if not 0 < coverage <= 1:
        raise ValueError("coverage must be in (0, 1]")
    total = fine_counts.sum()
    if total == 0:
        raise ValueError("no samples to cover")
    order = np.argsort(-fine_counts, kind="stable")
    running = np.cumsum(fine_counts[order])
    needed = int(np.searchsorted(running, coverage * total - 1e-9)) + 1
    return np.sort(order[:needed])
