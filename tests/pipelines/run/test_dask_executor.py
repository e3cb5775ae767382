"""`executor: dask`: every stage's jobs as Prefect tasks on one Dask cluster (here a local one, on
CPU): embed's groups of shards, cluster's assignment files, split's runs of input shards, train's
experts, evaluate's image features; the outputs are the local run's, byte for byte.

The same code path serves several hosts: only the `dask` section changes
(docs/clusters.md).
"""

import json
import os
from pathlib import Path

import pytest

from pipelines.core.config import load_config
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import file_sha256
from pipelines.run import executors  # here, not in a test: Prefect's import resets logging, and caplog with it

from conftest import now, prefect_harness, stop_processes, task_runs_since, write_config

pytestmark = pytest.mark.slow


def train_experts_on_dask(tiny_run, tmp_path, stages=("train",), **dask) -> Path:
    """Train the tiny run's experts from its seed through the moda flow with `executor: dask`;
    assert they ran in other processes; return the new run folder."""
    from pipelines.run.flows import moda

    seed = json.loads((tiny_run["run_dir"] / "train" / "registry.json").read_text())["seed"]["checkpoint"]
    config = write_config(tmp_path / "c.yaml", Path(load_config(tiny_run["config"]).synth.out_dir),
                          train={"seed_checkpoint": seed, "baseline": False, "batch_size": 16, "warmup": 2},
                          report={"seeds": 1}, executor="dask", dask=dask)
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "split"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    with prefect_harness():
        started = now()
        moda(config_path=str(config), run_dir=str(run), stages=list(stages))
        (run / "task_runs.json").write_text(json.dumps(sorted(task_runs_since(started))))
    ran_on = json.loads((run / "train" / "manifest.json").read_text())["counts"]["experts_ran_on"]
    assert set(ran_on) == {"expert_000", "expert_001"}
    assert all(int(where.rsplit(":", 1)[1]) != os.getpid() for where in ran_on.values())  # not in this process
    return run


def test_experts_train_in_dask_worker_processes_from_the_runs_seed(tiny_run, tmp_path):
    # the cluster named by its class and keyword arguments, as dask_jobqueue.SLURMCluster would be
    run = train_experts_on_dask(tiny_run, tmp_path, ("train", "evaluate"), cluster="distributed.LocalCluster",
                                cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                                "dashboard_address": None})
    registry = json.loads((run / "train" / "registry.json").read_text())
    for expert in registry["experts"]:
        weights = f"train/{expert['model_dir']}/open_clip_model.safetensors"
        # the same models as the tiny run trained on this host: where an expert trains (a Dask
        # worker, whose environment says OMP_NUM_THREADS=1) does not change it
        assert file_sha256(run / weights) == file_sha256(tiny_run["run_dir"] / weights), weights
    # evaluate's image features computed by the workers into the cache, then read by the stage: the
    # tiny run's bytes, though the workers ran torch on one thread each and the tiny run on every core
    # (MKL's strict reproducible mode, pipelines/core/devices.py), and so the same scores
    features = [name for name in json.loads((run / "task_runs.json").read_text()) if name.startswith("features-")]
    assert len(features) == 3  # the seed's and both experts'
    ours, theirs = (RunLayout(r).feature_cache for r in (run, tiny_run["run_dir"]))
    cached = sorted(p.name for p in ours.glob("*.npy"))
    assert cached and all(file_sha256(ours / name) == file_sha256(theirs / name) for name in cached)
    ours = json.loads((run / "evaluate" / "results.json").read_text())["tasks"]
    theirs = json.loads((tiny_run["run_dir"] / "evaluate" / "results.json").read_text())["tasks"]
    for task, entry in ours.items():
        for row in ("seed", "expert_000", "expert_001", "uniform ensemble"):
            assert entry[row] == theirs[task][row], (task, row)


def test_embed_cluster_and_split_on_dask_write_the_local_runs_bytes(tmp_path):
    from pipelines.run.flows import moda
    from pipelines.synth.generate import generate

    data = tmp_path / "data"
    sections = {"synth": {"shard_size": 20},  # 12 input shards: two embed groups, several assignment files
                "cluster": {"num_fine": 8, "num_experts": 2, "niter": 10, "sample_size": 100}}
    generate(load_config(write_config(tmp_path / "gen.yaml", data, **sections)).synth)
    local = write_config(tmp_path / "local.yaml", data, split={"shard_size": 30, "processes": 1}, **sections)
    dask = write_config(tmp_path / "dask.yaml", data, split={"shard_size": 30}, executor="dask",
                        dask={"local_workers": 2}, **sections)
    stages = ["embed", "cluster", "split"]
    with prefect_harness():
        moda(config_path=str(local), run_dir=str(tmp_path / "local"), stages=stages)
        started = now()
        moda(config_path=str(dask), run_dir=str(tmp_path / "dask"), stages=stages)
        jobs = task_runs_since(started)
    # the jobs ran as tasks on the cluster: embed's two groups, split's two runs (one per worker; the
    # local run had one), cluster's assignment files in runs
    assert {"embed-0", "embed-1", "split-0", "split-1"} <= jobs and any(j.startswith("assign-") for j in jobs)
    for stage in stages:
        ours = json.loads((tmp_path / "dask" / stage / "manifest.json").read_text())
        theirs = json.loads((tmp_path / "local" / stage / "manifest.json").read_text())
        assert ours["outputs"] and ours["outputs"] == theirs["outputs"], stage
        assert ours["fingerprint"] == theirs["fingerprint"], stage  # the executor is in no fingerprint


def test_an_unknown_executor_fails_at_load(tmp_path, tiny_data):
    from pipelines.core.config import ConfigError

    with pytest.raises(ConfigError, match="executor must be one of"):
        load_config(write_config(tmp_path / "c.yaml", tiny_data, executor="slurm"))
    with pytest.raises(ConfigError, match="train.executor moved to executor"):  # an old config is told where
        load_config(write_config(tmp_path / "c.yaml", tiny_data, train={"executor": "dask"}))


def test_a_cluster_class_is_an_import_path_with_its_keyword_arguments_and_excludes_an_address(tmp_path, tiny_data):
    from pipelines.core.config import ConfigError, DaskConfig
    from pipelines.run.executors import dask_cluster

    with dask_cluster(DaskConfig(cluster="distributed.LocalCluster",
                                 cluster_kwargs={"n_workers": 1, "processes": False,
                                                 "dashboard_address": None})) as address:
        assert address.startswith(("tcp://", "inproc://"))
    with dask_cluster(DaskConfig(address="tcp://h:8786")) as address:
        assert address == "tcp://h:8786"  # joined, not started
    with pytest.raises(ImportError, match="dask-jobqueue"), dask_cluster(DaskConfig(cluster="no_such.SLURMCluster")):
        pass
    for dask, match in (({"cluster": "distributed.LocalCluster", "address": "tcp://h:8786"}, "keep one"),
                        ({"cluster": "SLURMCluster"}, "import path"),
                        ({"cluster_kwargs": ["n_workers"]}, "mapping with string keys")):
        with pytest.raises(ConfigError, match=match):
            load_config(write_config(tmp_path / "c.yaml", tiny_data, dask=dask))


def test_a_workers_jobs_get_glibcs_allocator_back_and_the_flow_host_keeps_its_environment():
    """A nanny starts its worker with MALLOC_TRIM_THRESHOLD_=65536 (glibc's adaptive mmap threshold
    off: a CPU encoder took 1.17x the time) and leaves its workers' settings in the process that started
    a local cluster; a stage job on a worker resets the allocator, and what it starts (a trainer)
    inherits no such setting."""
    import subprocess
    import sys

    from distributed import Client

    from pipelines.core.config import DaskConfig
    from pipelines.core.jobs import Call

    before = dict(os.environ)
    child = [sys.executable, "-c", "import os; print(os.environ.get('MALLOC_TRIM_THRESHOLD_'))"]
    with executors.dask_cluster(DaskConfig(local_workers=1)) as address, Client(address) as client:
        assert dict(os.environ) == before  # no OMP_NUM_THREADS=1 left here for later children
        probe = client.submit(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                                       executors._run_stage_job.fn(Call(subprocess.check_output, (child,),
                                                                        {"text": True})),
                                       executors.undo_nanny_malloc()), pure=False).result()
        assert probe == ("65536", "None\n", False)  # set by the nanny; gone for the job's child; undone once
    assert executors.undo_nanny_malloc() is False  # nothing to undo outside a worker


def test_a_stage_cuts_its_work_for_the_clusters_threads_not_its_workers():
    """A SLURM job of 8 cores in one worker process runs 8 jobs at once: the stage must make enough."""
    from distributed import Client, LocalCluster

    from pipelines.run.executors import job_slots

    with LocalCluster(n_workers=1, threads_per_worker=3, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert job_slots(client.scheduler_info()["workers"]) == 3
    assert job_slots({"a": {"nthreads": 8}, "b": {"nthreads": 1}}) == 9
    assert job_slots({}) == 1  # no worker yet (a SLURM job still queued): one job, not none


def test_a_job_on_a_worker_gets_its_share_of_the_cores_the_worker_shares_with_its_neighbours():
    """Dask gives a worker threads, not cores: a split job decoding on every core it could see ran, in
    a SLURM job of `cores: 8, processes: 1`, 8 jobs of 8 threads on 8 cores. The affinity masks tell
    workers sharing cores (a local cluster) from SLURM jobs on one node (disjoint masks)."""
    from distributed import Client, LocalCluster

    from pipelines.core.devices import job_cores, usable_cores
    from pipelines.core.jobs import Call
    from pipelines.run.executors import _run_stage_job, cores_per_slot, worker_cpus

    one_slurm_job = {"w": {"host": "n1", "nthreads": 8}}
    assert cores_per_slot(one_slurm_job, {"w": list(range(8))}) == {"w": 1}
    local = {"a": {"host": "n1", "nthreads": 1}, "b": {"host": "n1", "nthreads": 1}}
    assert cores_per_slot(local, {"a": list(range(16)), "b": list(range(16))}) == {"a": 8, "b": 8}
    per_gpu_jobs = {"a": {"host": "n1", "nthreads": 1}, "b": {"host": "n1", "nthreads": 1},
                    "c": {"host": "n2", "nthreads": 1}}
    assert cores_per_slot(per_gpu_jobs, {"a": list(range(12)), "b": list(range(12, 24)), "c": list(range(12))}) \
        == {"a": 12, "b": 12, "c": 12}
    assert cores_per_slot({"w": {"host": "n1", "nthreads": 4}}, {"w": [0]}) == {"w": 1}  # never none

    assert job_cores() == usable_cores()  # outside a worker: the process's cores
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        cores = cores_per_slot(client.scheduler_info()["workers"], client.run(worker_cpus))
        assert list(cores.values()) == [max(1, usable_cores() // 2)]
        shares = client.gather([client.submit(_run_stage_job.fn, Call(job_cores), c, pure=False)
                                for c in (cores, {})])
        assert shares == [max(1, usable_cores() // 2)] * 2  # a worker not in the map: its CPUs over its threads
    assert job_cores() == usable_cores()


def test_the_run_waits_for_the_workers_it_asked_for_then_goes_on_with_those_that_joined(caplog):
    """A SLURM cluster's workers join when their jobs leave the queue; a stage that started before
    would cut its work for none of them."""
    import threading

    from distributed import LocalCluster

    from pipelines.core.config import DaskConfig
    from pipelines.run.executors import expected_workers, wait_for_workers

    assert expected_workers(DaskConfig(cluster="dask_jobqueue.SLURMCluster", cluster_kwargs={"n_workers": 8})) == 8
    assert expected_workers(DaskConfig(local_workers=3)) == 3
    assert expected_workers(DaskConfig(address="tcp://h:8786")) == 1  # a running cluster has what it has
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        threading.Timer(0.5, cluster.scale, (1,)).start()  # the first "SLURM job" starts half a second late
        assert wait_for_workers(cluster.scheduler_address, 1, timeout_s=60) == 1  # waited for it
        assert wait_for_workers(cluster.scheduler_address, 2, timeout_s=0.3) == 1  # then on with those there
        assert "1 of the 2 Dask workers asked for joined" in caplog.text


def test_a_cluster_no_worker_joins_is_an_error_naming_it_not_a_wait_without_end():
    from distributed import LocalCluster

    from pipelines.run.executors import NoWorkers, wait_for_workers

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:  # workers that never start
        address = cluster.scheduler_address
        with pytest.raises(NoWorkers, match=rf"no Dask worker joined the cluster at {address} in 0 s \(2 asked for\)"):
            wait_for_workers(address, 2, timeout_s=0.3)


class LateCluster:
    """A cluster class (by import path, as dask.cluster names one) whose workers join a second after
    it starts, as SLURM jobs leave the queue."""

    def __init__(self, n_workers: int):
        import threading

        from distributed import LocalCluster

        self.cluster = LocalCluster(n_workers=0, processes=False, dashboard_address=None)
        self.scheduler_address = self.cluster.scheduler_address
        threading.Timer(1.0, self.cluster.scale, (n_workers,)).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cluster.close()


def test_the_first_stage_on_a_started_cluster_finds_the_workers_asked_for():
    import contextlib

    from distributed import Client

    from pipelines.core.config import DaskConfig
    from pipelines.run.executors import RunCluster

    with contextlib.ExitStack() as stack:
        address = RunCluster(DaskConfig(cluster="test_dask_executor.LateCluster", cluster_kwargs={"n_workers": 2}),
                             stack).address()
        with Client(address) as client:
            assert len(client.scheduler_info()["workers"]) == 2  # both had joined before any stage cut its work


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two workers started as docs/clusters.md says (`dask scheduler`, `dask worker
    --resources GPU=1`), on loopback; stopped afterwards."""
    import subprocess
    import sys
    import time

    from pipelines.run.demo import free_port

    dask = str(Path(sys.executable).parent / "dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for i in range(2):
        procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                       "--resources", "GPU=1", "--name", f"gpu{i}", "--no-dashboard"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        stop_processes(procs)
        time.sleep(0.1)


def test_experts_train_on_an_existing_dask_cluster_at_dask_address(tiny_run, tmp_path, dask_cluster):
    train_experts_on_dask(tiny_run, tmp_path, address=dask_cluster)


def test_a_flow_without_a_dask_runner_keeps_the_jobs_on_this_host(tiny_data, tmp_path):
    from pipelines.run.executors import on_dask

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_data, executor="dask"))
    assert on_dask(cfg) is False  # outside a flow run on Dask: no Dask runner, local processes and slots
    assert on_dask(load_config(write_config(tmp_path / "d.yaml", tiny_data))) is False
