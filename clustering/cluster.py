"""Stage 2, cluster: fine centres on a sample, experts over the fine centres.

Reads the embed stage's files (never its in-memory objects), fits
`num_fine` balanced fine clusters on a sample of the caption embeddings,
groups the fine centres into `num_experts` experts balanced by data mass, and
assigns every embedded sample to its nearest fine centre and so to an expert.

Outputs: fine_centroids.npy (m, d), expert_of_fine.npy (m,),
expert_centroids.npy (n, d), assignments.parquet (key, shard, fine, expert),
report.json (sizes, imbalance factors, inertia, top caption terms per expert).
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

from clustering.embed import embedding_files, read_embeddings
from clustering.kmeans import (
    assign_nearest,
    balanced_kmeans,
    coarse_cluster,
    imbalance_factor,
    inertia,
)
from pipelines.config import ClusterConfig, section_hash
from pipelines.manifest import (
    atomic_path,
    atomic_write_json,
    combine,
    hash_outputs,
    is_done,
    read_manifest,
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


def run_cluster(cfg: ClusterConfig, embed_dir: Path, stage_dir: Path) -> dict:
    started = time.time()
    upstream = require_manifest(embed_dir, "embed")
    config_hash = section_hash(cfg)
    fingerprint = combine("cluster", config_hash, upstream["fingerprint"])
    if is_done(stage_dir, fingerprint):
        return {**read_manifest(stage_dir), "skipped": True}

    table, x = read_embeddings(embedding_files(embed_dir, upstream))
    n = x.shape[0]
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
    fine_centroids, sample_labels = balanced_kmeans(
        x[sample], cfg.num_fine, niter=cfg.niter, balance_iters=cfg.balance_iters, seed=cfg.seed
    )
    fine = assign_nearest(x, fine_centroids)
    mass = np.bincount(fine, minlength=cfg.num_fine)
    expert_centroids, expert_of_fine = coarse_cluster(
        fine_centroids, mass, cfg.num_experts, niter=cfg.niter,
        balance_iters=cfg.balance_iters, seed=cfg.seed,
    )
    expert = expert_of_fine[fine]
    if cfg.random_split:
        # Rand-n ablation: the same expert sizes, samples dealt at random.
        expert = np.random.default_rng(cfg.seed).permutation(expert)
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
    assignments = pa.table({
        "key": table.column("key"), "shard": table.column("shard"),
        "fine": pa.array(fine.astype(np.int32)), "expert": pa.array(expert.astype(np.int32)),
    })
    with atomic_path(stage_dir / "assignments.parquet") as tmp:
        pq.write_table(assignments, tmp)
    captions = table.column("caption").to_pylist()
    report = {
        "samples": n,
        "fit_sample": int(sample.size),
        "fine_sizes": mass.tolist(),
        "fine_imbalance_on_sample": imbalance_factor(sample_labels, cfg.num_fine),
        "fine_imbalance_all": imbalance_factor(fine, cfg.num_fine),
        "fine_inertia_per_sample": inertia(x, fine_centroids, fine) / n,
        "expert_sizes": expert_sizes.tolist(),
        "expert_imbalance": imbalance_factor(expert, cfg.num_experts),
        "expert_size_ratio": float(expert_sizes.max() / expert_sizes.min()),
        "expert_fine_clusters": [np.flatnonzero(expert_of_fine == c).tolist()
                                 for c in range(cfg.num_experts)],
        "expert_top_terms": top_terms(captions, expert, cfg.num_experts),
        "random_split": cfg.random_split,
    }
    atomic_write_json(stage_dir / "report.json", report)
    outputs = [stage_dir / f"{name}.npy" for name in arrays]
    outputs += [stage_dir / "assignments.parquet", stage_dir / "report.json"]
    return write_manifest(
        stage_dir, stage="cluster", fingerprint=fingerprint, config_hash=config_hash,
        inputs={"embed": upstream["fingerprint"]}, outputs=hash_outputs(stage_dir, outputs),
        counts={"samples": n, "experts": expert_sizes.tolist()}, started=started,
        extra={"num_fine": cfg.num_fine, "num_experts": cfg.num_experts},
    )
