"""Device choice shared by every stage that runs a model, and the CPU cores a stage may use."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar

import psutil

# Matrix products whose bits do not depend on how many threads computed them. Intel's MKL (torch's
# BLAS on x86) gives a small product other last bits with another thread count, so the same captions
# embedded by one process of 2 threads and by two of 1 differed in their last bits (a local run
# against a Dask or multi-process one: another embeddings file, then other clusters). Its strict
# conditional-reproducibility mode keeps ?gemm's results whatever the thread count (AVX2 and
# AVX-512 code paths). Its cost on 2 CPU cores (bench/blas_strict.py): the caption encoder at 0.95x
# its throughput, a CPU training step at 1.00x; a GPU's products are not MKL's. MKL reads the
# variable once, at the process's first matrix product, so it is set when this module is
# imported: every stage, job and trainer imports it, or inherits the environment, before that.
REPRODUCIBLE_BLAS = {"MKL_CBWR": "AUTO,STRICT"}


def reproducible_blas() -> dict[str, str]:
    """Put REPRODUCIBLE_BLAS in this process's environment (and so its children's), keeping a value
    the user set; returns what is in force."""
    return {name: os.environ.setdefault(name, value) for name, value in REPRODUCIBLE_BLAS.items()}


reproducible_blas()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container or `taskset` may
    allow fewer than the machine has, and `os.cpu_count()` counts them all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The cores the running job may use where several share a process (a Dask worker's threads): set
# by the executor around each job, per thread (a context variable), never for a whole process.
_JOB_CORES: ContextVar[int | None] = ContextVar("moda_job_cores", default=None)


def job_cores() -> int:
    """The cores one job may use: its share of its Dask worker's cores, where the executor set one
    (`sharing_cores`), else every core this process may use."""
    return _JOB_CORES.get() or usable_cores()


@contextlib.contextmanager
def sharing_cores(cores: int | None) -> Iterator[None]:
    """Run the block as a job with `cores` cores of its own (None: the process's)."""
    token = _JOB_CORES.set(cores)
    try:
        yield
    finally:
        _JOB_CORES.reset(token)


def cpu_threads() -> int:
    """Threads for one CPU-bound torch process that has the machine to itself: the physical cores
    it may use (torch's own default: hyper-threads slow its kernels down)."""
    physical = psutil.cpu_count(logical=False) or usable_cores()
    return max(1, min(usable_cores(), physical))


def pin_cpu_threads(threads: int | None = None) -> int:
    """Set torch's (and FAISS's, when it is loaded) CPU threads in the calling thread, rather than
    inherit them; returns the count.

    A float reduction's result depends on how many threads split it, and each library sizes its
    pool from whatever the process did before: Dask's local cluster leaves OMP_NUM_THREADS=1,
    an earlier stage or test may have called torch.set_num_threads. A stage rerun in a
    long-lived process (a Prefect worker, pytest) then encoded the same class names with another
    count than a fresh process and wrote results.json and routing.json that differed in the last
    bits (measured: 1 thread against 2 on the demo's models). OpenMP's setting is per thread,
    so this runs in the thread that does the work.
    """
    import torch

    threads = threads or cpu_threads()
    torch.set_num_threads(threads)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)
    return threads


def pick_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; anything else is kept (`cuda:1` too:
    ask `is_cuda` whether it is a GPU, never `== "cuda"`)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def is_cuda(device: str) -> bool:
    """Whether a torch device string names a CUDA GPU: `cuda` and `cuda:N` alike.

    Every choice that depends on running on a GPU (bf16 autocast, GPU slots, CUDA_VISIBLE_DEVICES,
    one embed process per GPU, a worker's GPU resource) asks this: comparing with `"cuda"` sent an
    explicit `cuda:0` down the CPU path (fp32, no GPU slot) without a word."""
    kind, _, index = str(device).partition(":")
    return kind == "cuda" and (not index or index.isdigit())


def cuda_index(device: str) -> int | None:
    """N of `cuda:N` (torch numbers the GPUs CUDA_VISIBLE_DEVICES leaves visible), None for a bare
    `cuda` or a device that is no GPU."""
    kind, _, index = str(device).partition(":")
    return int(index) if kind == "cuda" and index.isdigit() else None


def device_gpus(device: str, visible: list[str]) -> list[str]:
    """The visible GPU ids a device string may use: all for `cuda`, the N-th for `cuda:N`, none for
    a CPU. `visible` are the ids CUDA_VISIBLE_DEVICES lists (or 0..count-1)."""
    if not is_cuda(device):
        return []
    index = cuda_index(device)
    if index is None:
        return list(visible)
    if index >= len(visible):
        raise ValueError(f"device {device!r}: only {len(visible)} GPU(s) visible ({visible}); "
                         f"use cuda:0..cuda:{max(0, len(visible) - 1)} or cuda for all")
    return [visible[index]]
