"""Where a stage's independent jobs run: threads, Prefect tasks, or a Dask cluster.

A stage hands its jobs (callables) to `Hooks.runner`; this module makes the
runners, so the stages never import Prefect or Dask. Which executor runs a
job never changes its result (the executor fields are run-only in the config),
so switching `train.executor` from `local` to `dask` keeps every checkpoint.
"""

from __future__ import annotations

import logging

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError

from pipelines.core.config import TrainConfig


def logger() -> logging.Logger:
    """The Prefect run logger inside a run, the `moda` logger outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("moda")


@task(name="train-expert", cache_policy=NO_CACHE)
def _run_job(job):
    return job()


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
            annotations = {"resources": {"GPU": gpus_per_expert}} if job.common["device"] == "cuda" else {}
            with dask.annotate(**annotations):
                futures.append(_run_job.with_options(task_run_name=job.__name__).submit(job))
        return [future.result() for future in futures]
    return run


def on_dask(cfg: TrainConfig) -> bool:
    """`train.executor: dask` and this flow really runs on Dask (the `moda` flow gives it the runner);
    otherwise experts stay on this host's GPU slots."""
    if cfg.executor != "dask":
        return False
    from prefect_dask import DaskTaskRunner

    context = FlowRunContext.get()
    if context is not None and isinstance(context.task_runner, DaskTaskRunner):
        return True
    logger().warning("train.executor is dask, but this train flow was not started with a Dask task "
                     "runner (run it through the moda flow): training the experts on this host")
    return False


LOCAL_CLUSTER = "distributed.LocalCluster"


def dask_task_runner(cfg: TrainConfig):
    """The Dask task runner for `train.executor: dask`: the cluster at `dask_address`; or one of class
    `dask_cluster` (an import path, e.g. dask_jobqueue.SLURMCluster) made with `dask_cluster_kwargs`
    for the run; or a temporary local one of `dask_local_workers` processes."""
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    if cfg.dask_cluster:
        return DaskTaskRunner(cluster_class=cfg.dask_cluster, cluster_kwargs=dict(cfg.dask_cluster_kwargs))
    return DaskTaskRunner(cluster_class=LOCAL_CLUSTER,
                          cluster_kwargs={"n_workers": cfg.dask_local_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})
