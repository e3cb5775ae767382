"""Where a stage's independent jobs run: this host's processes, or the hooks' pool (a Dask cluster).

A stage cuts its work into jobs (picklable callables: a module-level function
with its arguments bound) whose results do not depend on where or with how
many others they run, and hands them to `run_jobs`. Locally each job gets a
spawned process of its own (the stage's own process when there is one job);
with the run's `executor: dask` the Prefect layer sets `Hooks.pool`, which
runs them as Prefect tasks on the cluster's workers. A stage never imports
Prefect or Dask.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol


class Pool(Protocol):
    """Runs jobs elsewhere: `workers` run at once; `map(jobs, gpu)` returns their results in order,
    each job given one GPU (a worker resource) when `gpu`."""

    workers: int

    def map(self, jobs: list[Callable[[], Any]], gpu: bool = False) -> list[Any]: ...


def die_with_parent() -> None:
    """A job process dies with the stage's (Linux PR_SET_PDEATHSIG), so a rerun never races it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
    except Exception:  # not Linux: the parent's pool still waits for its workers
        pass


def run_local(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Every job at once, each in a spawned process of its own; one job in this process."""
    if len(jobs) == 1:
        return [jobs[0]()]
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn"),
                             initializer=die_with_parent) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [future.result() for future in futures]


def run_jobs(pool: Pool | None, jobs: list[Callable[[], Any]], gpu: bool = False) -> list[Any]:
    """The jobs' results in order, run on `pool` or (None) on this host."""
    if not jobs:
        return []
    return pool.map(jobs, gpu) if pool is not None else run_local(jobs)


@dataclass(frozen=True)
class Call:
    """`fn(*args, **kwargs)` as a named, picklable job (a Prefect task run is named after it)."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict | None = None
    name: str = "job"

    @property
    def __name__(self) -> str:  # what runners name a job's task run
        return self.name

    def __call__(self) -> Any:
        return self.fn(*self.args, **(self.kwargs or {}))


def deal(items: list, jobs: int) -> list[list]:
    """`items` dealt round-robin into at most `jobs` non-empty lists (in order within each)."""
    jobs = max(1, min(jobs, len(items)))
    return [items[j::jobs] for j in range(jobs)] if items else []
