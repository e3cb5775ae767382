"""A stage's process jobs (pipelines/core/jobs.py): named, picklable, run here or on a pool, results in order."""

import os
import pickle

from pipelines.core.jobs import Call, deal, run_jobs


def pid_and(value):
    return os.getpid(), value


class RecordingPool:
    """A pool that runs jobs in this process and records what it was asked."""

    workers = 3

    def __init__(self):
        self.asked = []

    def map(self, jobs, gpu=False):
        self.asked.append(([job.__name__ for job in jobs], gpu))
        return [job() for job in jobs]


def test_a_call_is_a_named_picklable_job():
    job = Call(divmod, (7, 2), name="split-3")
    assert job() == (3, 1) and job.__name__ == "split-3"
    assert pickle.loads(pickle.dumps(job))() == (3, 1)


def test_jobs_run_in_spawned_processes_here_or_on_the_pool_in_order():
    jobs = [Call(pid_and, (i,), name=f"job-{i}") for i in range(3)]
    here = run_jobs(None, jobs)
    assert [v for _, v in here] == [0, 1, 2]
    assert os.getpid() not in {pid for pid, _ in here}  # spawned processes (a quick one may take several)
    assert run_jobs(None, jobs[:1]) == [(os.getpid(), 0)]  # one job: no process to spawn
    pool = RecordingPool()
    assert [v for _, v in run_jobs(pool, jobs, gpu=True)] == [0, 1, 2]
    assert pool.asked == [(["job-0", "job-1", "job-2"], True)]
    assert run_jobs(pool, []) == [] and len(pool.asked) == 1


def test_items_are_dealt_round_robin_into_at_most_the_jobs_asked():
    assert deal(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert deal([1, 2], 8) == [[1], [2]] and deal([], 4) == []
