"""Stage 2, cluster: fine centres on a sample, experts over the fine centres.

Reads the embed stage's files (never its in-memory objects), fits
`num_fine` balanced fine clusters on a sample of the caption embeddings (only
the sample is held in memory), assigns every embedded sample to its nearest
fine centre one file at a time, then groups the fine centres into
`num_experts` experts balanced by data mass (the samples behind each centre).

Outputs: fine_centroids.npy (m, d), expert_of_fine.npy (m,),
expert_centroids.npy (n, d), assignments.parquet (key, shard, fine, expert),
report.json (sizes, imbalance factors, inertia, spread and top caption terms per
expert), cluster_sizes.png, and the contact sheets (contact/expert_*.png, examples.md;
clustering/contact.py).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from clustering.assign import assign_files, choose_sample, read_sample, write_assignments
from clustering.contact import write_contact_sheets
from clustering.embeddings import embedding_files
from clustering.kmeans import (
    balanced_kmeans,
    coarse_cluster,
    imbalance_factor,
    inertia,
    normalize_rows,
    spread,
    use_gpu,
)
from pipelines.core.config import ClusterConfig, section_hash
from pipelines.core.devices import pick_device, pin_cpu_threads
from pipelines.core.manifest import atomic_path, atomic_write_json, combine, hash_outputs
from pipelines.core.stage import Fingerprint, Report, Stage, StageContext, StageResult

STOPWORDS = {
    "a", "an", "the", "of", "on", "in", "with", "and", "or", "to", "for", "by", "at", "from", "is", "are",
    "this", "that", "it", "its", "under", "over",
    "free", "download", "png", "jpg", "img", "dsc", "photo", "image", "pic", "hd", "4k",  # web boilerplate
}


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


def fingerprint(ctx: StageContext) -> Fingerprint:
    """What the cluster stage's outputs depend on: its config and the embed stage's fingerprint."""
    config_hash = section_hash(ctx.section)
    embed_fp = ctx.upstream["embed"]["fingerprint"]
    return Fingerprint(combine("cluster", config_hash, embed_fp), config_hash, {"embed": embed_fp})


def work(ctx: StageContext, fp: Fingerprint) -> StageResult:
    """Fit on a sample, assign everything file by file, group fine centres into experts."""
    cfg: ClusterConfig = ctx.section
    layout = ctx.layout
    device = pick_device(cfg.device)
    if not use_gpu():
        pin_cpu_threads()  # again, now that FAISS is loaded (run_stage pinned torch's)
    files = embedding_files(layout, ctx.upstream["embed"])
    rows_per_file = [pq.read_metadata(path).num_rows for path in files]
    n = sum(rows_per_file)
    if n == 0:
        raise ValueError(f"{layout.embed}: no embedded samples to cluster (empty data?)")
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
        slack=cfg.balance_slack, topk=cfg.balance_topk, device=device,
    )
    fit_seconds = time.time() - t_fit
    tqdm.write(f"cluster: {cfg.num_fine} fine centres fitted on {sample.size:,} embeddings in {fit_seconds:.1f} s "
               f"({device})", file=sys.stdout)
    sample_inertia = inertia(normalize_rows(x_sample), fine_centroids, sample_labels)
    del x_sample
    if sample.size == n:
        # Fitted on every sample: keep the balanced assignment the fit ended with. Nearest-centre
        # labels would undo the balance (1.10 against 1.01 on the demo data, one cluster empty).
        fine_per_file = np.split(sample_labels.astype(np.int32), np.cumsum(rows_per_file)[:-1])
        total_inertia = sample_inertia
    else:  # the rest was never seen by the fit: each sample to its nearest centre, file by file
        fine_per_file, total_inertia = assign_files(files, fine_centroids, ctx.hooks.pool, device)
    fine = np.concatenate(fine_per_file)
    mass = np.bincount(fine, minlength=cfg.num_fine)
    expert_centroids, expert_of_fine = coarse_cluster(
        fine_centroids, mass, cfg.num_experts, niter=cfg.niter, balance_iters=cfg.balance_iters,
        seed=cfg.seed, max_ratio=cfg.max_expert_ratio,
    )
    expert = expert_of_fine[fine]
    tqdm.write(f"cluster: experts formed: {cfg.num_experts} from {cfg.num_fine} fine clusters, "
               f"{n:,} samples assigned", file=sys.stdout)
    override = None
    if cfg.random_split:
        # Rand-n ablation: the same expert sizes, samples dealt at random.
        expert = override = np.random.default_rng(cfg.seed).permutation(expert)
    expert_sizes = np.bincount(expert, minlength=cfg.num_experts)
    if (expert_sizes == 0).any():
        empty = np.flatnonzero(expert_sizes == 0).tolist()
        raise ValueError(f"experts {empty} received no samples; lower cluster.num_experts")

    arrays = {layout.fine_centroids: fine_centroids, layout.expert_of_fine: expert_of_fine,
              layout.expert_centroids: expert_centroids}
    for path, array in arrays.items():
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, array)
    write_assignments(layout.assignments, files, fine_per_file, expert_of_fine, override)
    plot_sizes(mass, expert_sizes, layout.cluster_plot)
    sheets = write_contact_sheets(layout, files, fine_per_file, np.split(expert, np.cumsum(rows_per_file)[:-1]),
                                  fine_centroids, cfg.num_experts, ctx.data.train_shards, cfg.contact_images,
                                  cfg.contact_captions, cfg.contact_shards)
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
    atomic_write_json(layout.cluster_report, report)
    outputs = [*arrays, layout.assignments, layout.cluster_report, *sheets]
    return StageResult(
        outputs=hash_outputs(layout.cluster, outputs),
        counts={"samples": n, "experts": expert_sizes.tolist(), "fit_seconds": round(fit_seconds, 2)},
        extra={"num_fine": cfg.num_fine, "num_experts": cfg.num_experts},
    )


def reports(ctx: StageContext, manifest: dict) -> list[Report]:
    """The expert table (sizes, top caption terms) and the balance figures."""
    report = json.loads(ctx.layout.cluster_report.read_text(encoding="utf-8"))
    rows = [{"expert": e, "samples": n, "fine clusters": len(fines), "top terms": " ".join(terms)}
            for e, (n, fines, terms) in enumerate(zip(report["expert_sizes"], report["expert_fine_clusters"],
                                                      report["expert_top_terms"]))]
    examples = ctx.layout.cluster_examples
    return [Report("experts", "Expert sizes and the caption terms most typical of each", table=rows),
            Report("cluster-balance", "Cluster balance and inertia", markdown=balance_markdown(report))] + (
        [Report("cluster-examples", "Example captions per fine cluster (contact sheets in cluster/contact/)",
                markdown=examples.read_text(encoding="utf-8"))] if examples.is_file() else [])


def balance_markdown(report: dict) -> str:
    """The cluster report's balance figures as a short markdown table."""
    rows = [
        ("samples (fit sample)", f"{report['samples']} ({report['fit_sample']})"),
        ("fine imbalance factor, fit sample (balanced)", f"{report['fine_imbalance_on_sample']:.4f}"),
        ("fine imbalance factor, all data (nearest centre)", f"{report['fine_imbalance_all']:.4f}"),
        ("fine inertia per sample", f"{report['fine_inertia_per_sample']:.4f}"),
        ("expert sizes", ", ".join(str(n) for n in report["expert_sizes"])),
        ("largest / smallest expert", f"{report['expert_size_ratio']:.3f}"),
        ("expert spread (training priority)", ", ".join(f"{v:.3f}" for v in report["expert_spread"])),
    ]
    body = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## Clustering\n\n| | |\n|---|---|\n{body}\n\nPlot: `cluster_sizes.png` in the cluster folder.\n"


STAGE = Stage(name="cluster", section="cluster", reads=("embed",), fingerprint=fingerprint, work=work,
              reports=reports, on_cluster=True)
