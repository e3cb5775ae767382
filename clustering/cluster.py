"""Stage 2, cluster: fine centres on a sample, experts over the fine centres.

Reads the embed stage's files (never its in-memory objects), fits
`num_fine` balanced fine clusters on a sample of the caption embeddings (only
the sample is held in memory), assigns every embedded sample to its nearest
fine centre one file at a time, then groups the fine centres into
`num_experts` experts balanced by data mass (the samples behind each centre).

Outputs: fine_centroids.npy (m, d), expert_of_fine.npy (m,),
expert_centroids.npy (n, d), assignments.parquet (key, shard, fine, expert),
report.json (sizes, imbalance factors, inertia, spread and top caption terms per
expert), cluster_sizes.png.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tqdm import tqdm

from clustering.embed import embedding_files
from clustering.kmeans import (
    balanced_kmeans,
    coarse_cluster,
    imbalance_factor,
    inertia,
    normalize_rows,
    spread,
    top_candidates,
)
from pipelines.config import ClusterConfig, section_hash
from pipelines.manifest import (
    atomic_path,
    atomic_write_json,
    combine,
    hash_outputs,
    is_done,
    read_manifest,
    remove_stale_temps,
    require_manifest,
    write_manifest,
)

STOPWORDS = set(
    "a an the of on in with and or to for by at from is are this that it its under over "
    "free download png jpg img dsc photo image pic hd 4k".split()
)


def top_terms(captions: list[str], labels: np.ndarray, k: int, n_terms: int = 8) -> list[list[str]]:
    """Words most over-represented in each cluster's captions (count x log lift)."""
    tokenised = [[w for w in re.findall(r"[a-z]+", c.lower()) if w not in STOPWORDS and len(w) > 1]
                 for c in captions]
    overall = Counter(w for words in tokenised for w in words)
    total = sum(overall.values()) or 1
    terms = []
    for c in range(k):
        counts = Counter(w for words, lab in zip(tokenised, labels) if lab == c for w in words)
        size = sum(counts.values()) or 1
        scored = sorted(
            ((n * math.log((n / size) / (overall[w] / total)), w) for w, n in counts.items() if n >= 3),
            reverse=True,
        )
        terms.append([w for _, w in scored[:n_terms]])
    return terms


def choose_sample(n: int, sample_size: int, seed: int) -> np.ndarray:
    """Row indices the fine k-means is fitted on: all rows, or a seeded subset."""
    if sample_size == 0 or sample_size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))


def read_matrix(path: Path, rows: np.ndarray | None = None) -> np.ndarray:
    """The (n, d) float32 embeddings of one embed file (float16 storage is widened)."""
    column = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    if rows is not None:
        matrix = matrix[rows]
    return np.ascontiguousarray(matrix, dtype=np.float32)


def read_sample(files: list[Path], rows_per_file: list[int], sample: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Embeddings and captions of the global row indices `sample`, one file at a time."""
    offsets = np.concatenate([[0], np.cumsum(rows_per_file)])
    vectors, captions = [], []
    for f, path in enumerate(files):
        local = sample[(sample >= offsets[f]) & (sample < offsets[f + 1])] - offsets[f]
        if local.size:
            vectors.append(read_matrix(path, local))
            texts = pq.read_table(path, columns=["caption"]).column("caption")
            captions.extend(texts.take(pa.array(local)).to_pylist())
    return np.concatenate(vectors), captions


def assign_files(files: list[Path], fine_centroids: np.ndarray) -> tuple[list[np.ndarray], float]:
    """Nearest fine centre of every embedded sample, one file at a time.

    Returns the labels per file (int32; 4 bytes per sample is all that stays
    in memory) and the total inertia (sum of squared distances).
    """
    labels, total_inertia = [], 0.0
    for path in tqdm(files, desc="assign", unit="shard"):
        x = read_matrix(path)
        if not x.shape[0]:
            labels.append(np.zeros(0, np.int32))
            continue
        sims, idx = top_candidates(x, fine_centroids, 1)
        labels.append(idx[:, 0].astype(np.int32))
        total_inertia += float(np.sum(2.0 - 2.0 * sims[:, 0].astype(np.float64)))
    return labels, total_inertia


def write_assignments(path: Path, files: list[Path], fine_per_file: list[np.ndarray],
                      expert_of_fine: np.ndarray, expert_override: np.ndarray | None) -> None:
    """assignments.parquet (key, shard, fine, expert), one row group per input file, atomically."""
    schema = pa.schema([("key", pa.string()), ("shard", pa.string()), ("fine", pa.int32()), ("expert", pa.int32())])
    offset = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for source, fine in zip(files, fine_per_file):
            ids = pq.read_table(source, columns=["key", "shard"])
            if expert_override is None:
                expert = expert_of_fine[fine]
            else:
                expert = expert_override[offset:offset + fine.size]
            offset += fine.size
            writer.write_table(pa.table({
                "key": ids.column("key"), "shard": ids.column("shard"),
                "fine": pa.array(fine, pa.int32()), "expert": pa.array(expert.astype(np.int32)),
            }, schema=schema))


def plot_sizes(fine_sizes: np.ndarray, expert_sizes: np.ndarray, path: Path) -> None:
    """cluster_sizes.png: sorted fine cluster sizes, and samples per expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1]})
    left.plot(np.sort(fine_sizes)[::-1], lw=1)
    left.axhline(fine_sizes.mean(), color="grey", ls="--", lw=0.8, label="mean")
    left.set(xlabel="fine cluster (largest first)", ylabel="samples", title="Fine clusters (all data)")
    left.legend()
    right.bar(range(expert_sizes.size), expert_sizes)
    right.set(xlabel="expert", ylabel="samples", title="Experts")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def cluster_fingerprint(cfg: ClusterConfig, embed_dir: Path) -> str:
    """What the cluster stage's outputs depend on: its config and the embed stage's fingerprint."""
    return combine("cluster", section_hash(cfg), require_manifest(embed_dir, "embed")["fingerprint"])


def run_cluster(cfg: ClusterConfig, embed_dir: Path, stage_dir: Path) -> dict:
    """Fit on a sample, assign everything file by file, group fine centres into experts."""
    started = time.time()
    upstream = require_manifest(embed_dir, "embed")
    config_hash = section_hash(cfg)
    fingerprint = cluster_fingerprint(cfg, embed_dir)
    if is_done(stage_dir, fingerprint):
        return {**read_manifest(stage_dir), "skipped": True}

    remove_stale_temps(stage_dir)
    files = embedding_files(embed_dir, upstream)
    rows_per_file = [pq.read_metadata(path).num_rows for path in files]
    n = sum(rows_per_file)
    if n == 0:
        raise ValueError(f"{embed_dir}: no embedded samples to cluster (empty data?)")
    if n < cfg.num_fine:
        raise ValueError(
            f"cluster.num_fine={cfg.num_fine} is more than the {n} embedded samples; "
            "lower num_fine or add data"
        )
    sample = choose_sample(n, cfg.sample_size, cfg.seed)
    if sample.size < cfg.num_fine:
        raise ValueError(f"cluster.sample_size={sample.size} is below num_fine={cfg.num_fine}")
    x_sample, sample_captions = read_sample(files, rows_per_file, sample)
    t_fit = time.time()
    fine_centroids, sample_labels = balanced_kmeans(
        x_sample, cfg.num_fine, niter=cfg.niter, balance_iters=cfg.balance_iters, seed=cfg.seed,
        slack=cfg.balance_slack, topk=cfg.balance_topk,
    )
    fit_seconds = time.time() - t_fit
    sample_inertia = inertia(normalize_rows(x_sample), fine_centroids, sample_labels)
    del x_sample
    fine_per_file, total_inertia = assign_files(files, fine_centroids)
    fine = np.concatenate(fine_per_file)
    mass = np.bincount(fine, minlength=cfg.num_fine)
    expert_centroids, expert_of_fine = coarse_cluster(
        fine_centroids, mass, cfg.num_experts, niter=cfg.niter, balance_iters=cfg.balance_iters,
        seed=cfg.seed, max_ratio=cfg.max_expert_ratio,
    )
    expert = expert_of_fine[fine]
    override = None
    if cfg.random_split:
        # Rand-n ablation: the same expert sizes, samples dealt at random.
        expert = override = np.random.default_rng(cfg.seed).permutation(expert)
    expert_sizes = np.bincount(expert, minlength=cfg.num_experts)
    if (expert_sizes == 0).any():
        empty = np.flatnonzero(expert_sizes == 0).tolist()
        raise ValueError(f"experts {empty} received no samples; lower cluster.num_experts")

    stage_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"fine_centroids": fine_centroids, "expert_of_fine": expert_of_fine,
              "expert_centroids": expert_centroids}
    for name, array in arrays.items():
        with atomic_path(stage_dir / f"{name}.npy") as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array)
    write_assignments(stage_dir / "assignments.parquet", files, fine_per_file, expert_of_fine, override)
    plot_sizes(mass, expert_sizes, stage_dir / "cluster_sizes.png")
    terms_at = np.arange(sample.size)
    if cfg.terms_sample and sample.size > cfg.terms_sample:
        terms_at = np.sort(np.random.default_rng(cfg.seed).choice(sample.size, cfg.terms_sample, replace=False))
    report = {
        "samples": n,
        "fit_sample": int(sample.size),
        "fine_sizes": mass.tolist(),
        "fine_imbalance_on_sample": imbalance_factor(sample_labels, cfg.num_fine),
        "fine_imbalance_all": imbalance_factor(fine, cfg.num_fine),
        "fine_inertia_per_sample_on_sample": sample_inertia / sample.size,
        "fine_inertia_per_sample": total_inertia / n,
        "expert_sizes": expert_sizes.tolist(),
        "expert_imbalance": imbalance_factor(expert, cfg.num_experts),
        "expert_size_ratio": float(expert_sizes.max() / expert_sizes.min()),
        "expert_spread": spread(fine_centroids, expert_of_fine, expert_centroids).tolist(),
        "expert_fine_clusters": [np.flatnonzero(expert_of_fine == c).tolist()
                                 for c in range(cfg.num_experts)],
        "expert_top_terms": top_terms([sample_captions[i] for i in terms_at], expert[sample[terms_at]],
                                       cfg.num_experts),
        "top_terms_from": int(terms_at.size),
        "random_split": cfg.random_split,
    }
    atomic_write_json(stage_dir / "report.json", report)
    outputs = [stage_dir / f"{name}.npy" for name in arrays]
    outputs += [stage_dir / "assignments.parquet", stage_dir / "report.json"]
    return write_manifest(
        stage_dir, stage="cluster", fingerprint=fingerprint, config_hash=config_hash,
        inputs={"embed": upstream["fingerprint"]}, outputs=hash_outputs(stage_dir, outputs),
        counts={"samples": n, "experts": expert_sizes.tolist(), "fit_seconds": round(fit_seconds, 2)},
        started=started,
        extra={"num_fine": cfg.num_fine, "num_experts": cfg.num_experts},
    )
