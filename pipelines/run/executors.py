"""Where a stage's independent jobs run: threads, Prefect tasks, or a Dask cluster.

A stage hands its jobs (callables) to `Hooks.runner` (train's models) or
`Hooks.pool` (every other stage's process jobs, pipelines/core/jobs.py); this
module makes them, so the stages never import Prefect or Dask. Which executor
runs a job never changes its result (the executor is in no fingerprint), so
switching the run's `executor` from `local` to `dask` keeps every output.
With `executor: dask` the `moda` flow starts (or joins) one cluster for the
whole run (`dask_cluster`) and runs each stage's flow on a Dask task runner
connected to it, so SLURM jobs are queued once, not once per stage.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
from collections.abc import Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError

from pipelines.core.config import Config, DaskConfig
from pipelines.core.devices import is_cuda, sharing_cores, usable_cores


def logger() -> logging.Logger:
    """The Prefect run logger inside a run, the `moda` logger outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("moda")


# What a Dask nanny sets in the environment before it starts a worker (distributed's
# `distributed.nanny.pre-spawn-environ`), and leaves behind in the process that started it.
NANNY_MALLOC = "MALLOC_TRIM_THRESHOLD_"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper bound for its adaptive mmap threshold on 64-bit


def undo_nanny_malloc() -> bool:
    """Give this Dask worker, and what it starts, glibc's allocator behaviour back.

    A nanny starts its worker with MALLOC_TRIM_THRESHOLD_=65536, which turns
    off glibc's adaptive mmap threshold: every buffer over 128 KiB is then
    mapped and unmapped afresh, and a torch encoder's activations page-fault
    on each batch. Measured (bench/results/dask_throughput_cpu_2026-12-04.md):
    a CPU embed job took 1.17x a plain process's time on a worker (median of 6, bench/dask_malloc.py), and
    embed, cluster and split on two workers made 0.70x the local run's
    throughput (0.98-1.04x with this). glibc reads the variable only at start,
    so this process gets mallopt's thresholds at the adaptive one's ceiling,
    and the variable leaves the environment so that what the job starts (a
    trainer, spawned processes) starts with glibc's defaults.

    Returns whether it reset the allocator: False where no nanny set the
    variable, in a later job of the same worker (nothing left to undo), and
    outside glibc.
    """
    if os.environ.pop(NANNY_MALLOC, None) is None:
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                    and libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_MAX))
    except (OSError, AttributeError):  # no glibc: nothing to undo
        return False


@task(name="train-expert", cache_policy=NO_CACHE)
def _run_job(job):
    undo_nanny_malloc()
    return job()


@task(name="stage-job", cache_policy=NO_CACHE)
def _run_stage_job(job, cores: dict[str, int] | None = None):
    """`job` on a worker, with its share of the worker's cores (`cores`: worker address -> cores per
    job, `cores_per_slot`) as `job_cores()`."""
    undo_nanny_malloc()
    with sharing_cores(this_workers_share(cores or {})):
        return job()


def worker_cpus() -> list[int]:
    """The CPUs this process may run on (run on each worker when a stage's pool is made)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cores_per_slot(workers: dict, cpus: dict[str, list[int]]) -> dict[str, int]:
    """Worker address -> the cores one of its jobs may use: its CPUs over the job slots (threads) of
    every worker on its host that may run on any of them.

    Dask runs one job per worker thread at once and gives a worker no core
    count, only threads. A split job that decoded on every core it could see
    ran, on a SLURM job of `cores: 8, processes: 1` (8 threads), 8 jobs of 8
    decode threads on 8 cores; local workers (`--nworkers 2 --nthreads 1`)
    share one affinity mask, separate SLURM jobs on one node have disjoint
    ones, and only the masks tell the two apart."""
    share = {}
    for address, info in workers.items():
        mine = set(cpus.get(address) or ())
        if not mine:
            continue
        sharing = sum(int(other.get("nthreads", 1)) for a, other in workers.items()
                      if other.get("host") == info.get("host") and mine & set(cpus.get(a) or ()))
        share[address] = max(1, len(mine) // max(1, sharing))
    return share


def this_workers_share(cores: dict[str, int]) -> int | None:
    """This Dask worker's cores per job (from `cores`, else its CPUs over its threads); None outside
    a worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    return cores.get(worker.address) or max(1, usable_cores() // max(1, worker.state.nthreads))


def prefect_runner(jobs, concurrency: int):
    """Each job a Prefect task on the flow's task runner; the GPU slots inside the jobs bound the
    concurrency."""
    futures = [_run_job.with_options(task_run_name=getattr(job, "__name__", "job")).submit(job) for job in jobs]
    return [future.result() for future in futures]


def dask_runner(gpus_per_expert: int):
    """Each job a Prefect task on the flow's Dask cluster, asking for its GPUs as a worker resource."""
    def run(jobs, concurrency: int):
        import dask

        futures = []
        for job in jobs:
            annotations = {"resources": {"GPU": gpus_per_expert}} if is_cuda(job.common["device"]) else {}
            with dask.annotate(**annotations):
                futures.append(_run_job.with_options(task_run_name=job.__name__).submit(job))
        return [future.result() for future in futures]
    return run


def job_slots(workers: dict) -> int:
    """The jobs a cluster runs at once: its workers' threads, not its workers. A SLURMCluster job of
    `cores: 8, processes: 1` is one worker of 8 threads; counting it as one cut a stage into one
    worker's share of jobs (split: a single run of shards) and left 7 of its cores idle."""
    return max(1, sum(int(info.get("nthreads", 1)) for info in workers.values()))


class DaskPool:
    """A stage's process jobs as Prefect tasks on the flow's Dask task runner (pipelines/core/jobs.py
    `Pool`): `workers` is how many jobs the cluster runs at once when the stage starts."""

    def __init__(self, task_runner):
        self.task_runner = task_runner
        client = task_runner.client
        workers = client.scheduler_info().get("workers", {})
        self.workers = job_slots(workers)
        self.cores = cores_per_slot(workers, client.run(worker_cpus)) if workers else {}

    def map(self, jobs, gpu: bool = False):
        import dask

        futures = []
        with dask.annotate(**({"resources": {"GPU": 1}} if gpu else {})):
            for job in jobs:
                name = getattr(job, "__name__", "job")
                futures.append(_run_stage_job.with_options(task_run_name=name).submit(job, self.cores))
        return [future.result() for future in futures]


def dask_runner_of_flow():
    """The Dask task runner this flow runs on, or None."""
    from prefect_dask import DaskTaskRunner

    context = FlowRunContext.get()
    if context is not None and isinstance(context.task_runner, DaskTaskRunner):
        return context.task_runner
    return None


def on_dask(cfg: Config) -> bool:
    """`executor: dask` and this flow really runs on Dask (the `moda` flow gives its stage flows the
    runner); otherwise the jobs stay on this host."""
    if cfg.executor != "dask":
        return False
    if dask_runner_of_flow() is not None:
        return True
    logger().warning("executor is dask, but this flow was not started with a Dask task runner (run it "
                     "through the moda flow): running its jobs on this host")
    return False


LOCAL_CLUSTER = "distributed.LocalCluster"


def cluster_class(path: str):
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"dask.cluster: cannot import {path!r} ({err}); install the package that provides it "
                          "(dask-jobqueue for SLURMCluster, dask-kubernetes for KubeCluster)") from err


@contextlib.contextmanager
def dask_cluster(cfg: DaskConfig) -> Iterator[str]:
    """The scheduler address of the run's Dask cluster: `address` as given; or a cluster of class
    `cluster` (an import path, e.g. dask_jobqueue.SLURMCluster) made with `cluster_kwargs`, or a
    temporary local one of `local_workers` processes, closed when the run ends."""
    if cfg.address:
        yield cfg.address
        return
    before = dict(os.environ)
    if cfg.cluster:
        made = cluster_class(cfg.cluster)(**cfg.cluster_kwargs)
    else:
        made = cluster_class(LOCAL_CLUSTER)(n_workers=cfg.local_workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None)
    restore_environ(before)
    with made:
        yield made.scheduler_address


def restore_environ(before: dict[str, str]) -> None:
    """The environment as it was before a cluster started: a local nanny leaves its workers' settings
    (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_...) in this process, where every later child
    (a trainer, a stage's spawned jobs) would inherit them."""
    for name in set(os.environ) - set(before):
        del os.environ[name]
    os.environ.update(before)


class RunCluster:
    """The run's Dask cluster, started (or joined) when a stage first needs it and closed with
    `stack`: a run whose stages are all done queues no SLURM job."""

    def __init__(self, cfg: DaskConfig, stack: contextlib.ExitStack):
        self.cfg, self.stack, self._address = cfg, stack, None

    def address(self) -> str:
        if self._address is None:
            address = self.stack.enter_context(dask_cluster(self.cfg))
            wait_for_workers(address, expected_workers(self.cfg), self.cfg.workers_timeout_s)
            self._address = address
            logger().info("stages run their jobs on the Dask cluster at %s", self._address)
        return self._address


def expected_workers(cfg: DaskConfig) -> int:
    """The workers the run asked for: the cluster class's `n_workers`, the local cluster's
    `local_workers`, one at an address (a running cluster has what it has)."""
    if cfg.address:
        return 1
    if cfg.cluster:
        return max(1, int(cfg.cluster_kwargs.get("n_workers") or 1))
    return cfg.local_workers


class NoWorkers(RuntimeError):
    """No Dask worker joined the run's cluster in time."""


def wait_for_workers(address: str, expected: int, timeout_s: float) -> int:
    """Wait up to `timeout_s` for `expected` workers; returns how many joined. The stages cut their
    work for the threads there when they start, so fewer than asked for is a warning and the run
    goes on; none at all is an error, not a wait without end (a worker that dies at its start, a
    SLURM job that never leaves the queue, hung the run before)."""
    from distributed import Client

    with Client(address, timeout="60s") as client:
        try:
            client.wait_for_workers(expected, timeout=timeout_s)
        except TimeoutError:
            joined = len(client.scheduler_info().get("workers", {}))
            if not joined:
                raise NoWorkers(
                    f"no Dask worker joined the cluster at {address} in {timeout_s:.0f} s ({expected} asked for): "
                    "look at its workers' logs (SLURMCluster: `squeue` and the job logs in its log_directory) "
                    "for a worker that could not start, or raise dask.workers_timeout_s if the queue is slow"
                ) from None
            logger().warning("%d of the %d Dask workers asked for joined in %.0f s (dask.workers_timeout_s); the "
                             "stages cut their jobs for those that have", joined, expected, timeout_s)
        return len(client.scheduler_info().get("workers", {}))


def dask_task_runner(address: str):
    """A Prefect Dask task runner on the run's cluster (one per stage flow, all on one cluster)."""
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)
