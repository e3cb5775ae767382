"""Balanced fine clustering against plain `faiss.Kmeans` on the same data and niter.

    .venv/bin/python bench/cluster_balance.py [--n 200000] [--dim 384] [--k 1024] [--niter 20]
                                              [--embeddings file.npy] [--repeats 1]

Peer, named: `faiss.Kmeans(d, k, niter, spherical=True)` followed by the
nearest-centroid assignment of every point (what an unbalanced fine step
costs). Ours: `clustering.kmeans.balanced_kmeans` with the same total niter
(the last `balance_iters` of them balanced). Prints both wall times and their
ratio, both imbalance factors (faiss.contrib.clustering.imbalance_factor) and
both inertias (sum of squared distances to the assigned centre).

Data: `--embeddings` (an (N, d) float32 .npy of real caption embeddings), or
a synthetic stand-in for caption embeddings: a Zipf-sized mixture of 4 x k
anisotropic blobs on the unit sphere, so that plain k-means is unbalanced.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.pairs import Ratio, alternate  # noqa: E402


def synthetic_embeddings(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    """Unit rows from a Zipf-weighted mixture of 4k blobs sharing a common direction."""
    rng = np.random.default_rng(seed)
    components = 4 * k
    common = rng.normal(size=dim)
    means = rng.normal(size=(components, dim)) + 1.5 * common / np.linalg.norm(common) * np.sqrt(dim) / 4
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, components + 1) ** 0.8
    which = rng.choice(components, size=n, p=weights / weights.sum())
    scales = rng.uniform(0.02, 0.06, size=components).astype(np.float32)
    x = means[which].astype(np.float32) + rng.normal(size=(n, dim)).astype(np.float32) * scales[which, None]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def plain_faiss(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    import faiss

    t0 = time.perf_counter()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True,
                      max_points_per_centroid=max(256, -(-x.shape[0] // k)))
    km.train(x)
    _, labels = km.index.search(x, 1)
    return time.perf_counter() - t0, km.centroids, labels[:, 0]


def ours(x: np.ndarray, k: int, niter: int, seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    from clustering.kmeans import balanced_kmeans

    t0 = time.perf_counter()
    centroids, labels = balanced_kmeans(x, k, niter=niter, seed=seed)
    return time.perf_counter() - t0, centroids, labels


def main() -> None:
    import faiss
    from faiss.contrib.clustering import imbalance_factor

    from clustering.kmeans import inertia

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved pairs")
    parser.add_argument("--embeddings", type=Path, help="(N, d) float32 .npy of real embeddings")
    args = parser.parse_args()

    if args.embeddings:
        x = np.load(args.embeddings).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        source = str(args.embeddings)
    else:
        x = synthetic_embeddings(args.n, args.dim, args.k, args.seed)
        source = "synthetic Zipf mixture"
    x = np.ascontiguousarray(x)
    print(f"data: {x.shape[0]} x {x.shape[1]} ({source}) -> k={args.k}, niter={args.niter}, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {platform.machine()}")

    done = alternate(lambda r: ours(x, args.k, args.niter, args.seed),
                     lambda r: plain_faiss(x, args.k, args.niter, args.seed), args.repeats)
    (_, c_ours, l_ours), (_, c_plain, l_plain) = done[-1]
    t_ours, t_plain = float(np.median([o[0] for o, _ in done])), float(np.median([p[0] for _, p in done]))
    time_ratio = Ratio("time moda / faiss", tuple(o[0] / p[0] for o, p in done))
    i_plain = inertia(x, c_plain, l_plain)
    i_ours = inertia(x, c_ours, l_ours)
    rows = [
        ("plain faiss.Kmeans + assign", t_plain, imbalance_factor(args.k, l_plain), i_plain,
         np.bincount(l_plain, minlength=args.k)),
        ("moda balanced_kmeans", t_ours, imbalance_factor(args.k, l_ours), i_ours,
         np.bincount(l_ours, minlength=args.k)),
    ]
    print("| method | seconds | imbalance factor | inertia | min..max cluster size |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, imb, iner, sizes in rows:
        print(f"| {name} | {seconds:.1f} | {imb:.4f} | {iner:.1f} | {sizes.min()}..{sizes.max()} |")
    print(f"{time_ratio} (bar: <= 1.5x; seconds above are medians)")
    print(f"inertia ratio moda / faiss: {i_ours / i_plain:.4f} (bar: <= 1.03)")
    print(f"imbalance factor moda: {rows[1][2]:.4f} (bar: <= 1.05), faiss: {rows[0][2]:.4f}")


if __name__ == "__main__":
    main()
