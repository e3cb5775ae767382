"""Nearest-centre search: each row's top-k most similar centres, on a CPU through FAISS and on a
GPU through torch. The balanced k-means (clustering/kmeans.py) and the assignment of every sample
(clustering/assign.py) search through it."""

from __future__ import annotations

import numpy as np

from pipelines.core.devices import is_cuda


def use_gpu() -> bool:
    """FAISS GPU indexes when the installed faiss is a GPU build and sees a GPU."""
    import faiss  # lazy, as everywhere: a stage that is skipped never pays the import

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class CentreSearch:
    """Each row's `topk` most similar centres (inner product), best first: FAISS's flat index on a
    CPU; on a GPU (`device` cuda or cuda:N, or `engine: torch` anywhere) a matrix product and
    torch.topk, with the centres uploaded once and the rows streamed in chunks.

    Why torch on a GPU: FAISS's GPU build (faiss-gpu-cu12) needs CUDA 12 runtimes and cannot be
    installed beside moda's CUDA 13 torch, so on a GPU node the balanced k-means's candidate search
    and the assignment of every sample ran on the CPU. A flat search is one GEMM and a top-k, which
    torch does on any device; both engines return the same candidates (tests/clustering/test_kmeans.py runs
    the torch engine on a CPU against FAISS)."""

    CHUNK = 65536  # rows a product: 65536 x 1024 float32 similarities are 256 MB

    def __init__(self, centroids: np.ndarray, device: str = "cpu", engine: str = "auto"):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.device = device
        self._index = None
        self.engine = engine if engine != "auto" else ("torch" if is_cuda(device) else "faiss")
        if self.engine == "torch":
            import torch

            self._centres = torch.from_numpy(self.centroids).to(device)

    def top(self, x: np.ndarray, topk: int, columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(sims (N, t), indices (N, t) into all centres) over the centres `columns` (default all)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        count = self.centroids.shape[0] if columns is None else len(columns)
        topk = min(topk, count)
        if self.engine == "faiss":
            if columns is None:  # the index over every centre, built once (a GPU build's too)
                if self._index is None:
                    self._index = self._faiss_index(self.centroids)
                index = self._index
            else:
                index = self._faiss_index(self.centroids[columns])
            sims, idx = index.search(x, topk)
            idx = idx.astype(np.int64)
        else:
            sims, idx = self._torch(x, columns, topk)
        return sims, (idx if columns is None else np.asarray(columns, dtype=np.int64)[idx])

    @staticmethod
    def _faiss_index(centroids: np.ndarray):
        import faiss

        index = faiss.IndexFlatIP(centroids.shape[1])
        if use_gpu():
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(np.ascontiguousarray(centroids))
        return index

    def _torch(self, x: np.ndarray, columns: np.ndarray | None, topk: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        centres = self._centres if columns is None else \
            self._centres[torch.as_tensor(np.asarray(columns, dtype=np.int64), device=self.device)]
        sims = np.empty((x.shape[0], topk), dtype=np.float32)
        idx = np.empty((x.shape[0], topk), dtype=np.int64)
        with torch.no_grad():
            for start in range(0, x.shape[0], self.CHUNK):
                rows = torch.from_numpy(x[start:start + self.CHUNK]).to(self.device, non_blocking=True)
                values, indices = torch.topk(rows @ centres.T, topk, dim=1)
                sims[start:start + len(rows)] = values.cpu().numpy()
                idx[start:start + len(rows)] = indices.cpu().numpy()
        return sims, idx
