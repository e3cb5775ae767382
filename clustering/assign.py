"""From embeddings to cluster ids, file by file: the sample the centres are fitted on, the
nearest-centre assignment of every sample, and the assignments file the split reads.

Used by the cluster stage and by add-expert (new data assigned to a run's
existing fine centres). Memory: the fit sample, plus 4 bytes per sample for
its fine id; the embeddings themselves are read one file at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from clustering.embeddings import read_matrix
from clustering.search import CentreSearch
from pipelines.core.devices import is_cuda
from pipelines.core.jobs import Call, Pool, run_jobs
from pipelines.core.manifest import atomic_path

ASSIGNMENT_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("fine", pa.int32()),
                               ("expert", pa.int32())])


def choose_sample(n: int, sample_size: int, seed: int) -> np.ndarray:
    """Row indices the fine k-means is fitted on: all rows, or a seeded subset."""
    if sample_size == 0 or sample_size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=sample_size, replace=False))


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


def nearest_centres(files: list[Path], fine_centroids: np.ndarray,
                    bar: bool = True, device: str = "cpu") -> tuple[list[np.ndarray], list[float]]:
    """Nearest fine centre of every sample of each file (int32) and each file's inertia (sum of
    squared distances), one file at a time, the centres on `device` once for all files."""
    search = CentreSearch(fine_centroids, device)
    labels, inertias = [], []
    for path in tqdm(files, desc="assign", unit="shard", disable=not bar):
        x = read_matrix(path)
        if not x.shape[0]:
            labels.append(np.zeros(0, np.int32))
            inertias.append(0.0)
            continue
        _, idx = search.top(x, 1)
        labels.append(idx[:, 0].astype(np.int32))
        # The inertia from each row's own dot product in float64, not FAISS's similarities: those
        # come from a BLAS call whose last bits depend on its thread count (a Dask worker's one
        # thread against this host's two wrote another report.json).
        sims = np.einsum("ij,ij->i", x.astype(np.float64), fine_centroids[idx[:, 0]].astype(np.float64))
        inertias.append(float(np.sum(2.0 - 2.0 * sims)))
    return labels, inertias


def assign_files(files: list[Path], fine_centroids: np.ndarray,
                 pool: Pool | None = None, device: str = "cpu") -> tuple[list[np.ndarray], float]:
    """Nearest fine centre of every embedded sample: here file by file, or as contiguous runs of
    files on the hooks' pool (four per worker).

    Returns the labels per file (int32; 4 bytes per sample is all that stays
    in memory) and the total inertia, summed over the files in order (so
    where a file was assigned does not change it).
    """
    if pool is None or len(files) < 2:
        labels, inertias = nearest_centres(files, fine_centroids, device=device)
    else:
        runs = [list(run) for run in np.array_split(np.array(files, dtype=object), min(len(files), 4 * pool.workers))]
        gpu = is_cuda(device)  # a GPU job asks its worker for a GPU and searches on the worker's own
        done = run_jobs(pool, [Call(nearest_centres, (run, fine_centroids, False, "cuda" if gpu else "cpu"),
                                    name=f"assign-{i}") for i, run in enumerate(runs)], gpu=gpu)
        labels = [lab for run_labels, _ in done for lab in run_labels]
        inertias = [v for _, run_inertias in done for v in run_inertias]
    total = 0.0
    for value in inertias:
        total += value
    return labels, total


def write_assignments(path: Path, files: list[Path], fine_per_file: list[np.ndarray],
                      expert_of_fine: np.ndarray, expert_override: np.ndarray | None) -> None:
    """assignments (key, shard, fine, expert), one row group per input file, atomically.

    `expert_override` (one expert per sample, in file order) replaces the
    experts of the fine clusters: the Rand-n ablation deals samples at random.
    """
    offset = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, ASSIGNMENT_SCHEMA) as writer:
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
            }, schema=ASSIGNMENT_SCHEMA))
