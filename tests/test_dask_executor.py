"""`train.executor: dask`: experts as Prefect tasks on a Dask cluster (here a local one, on CPU).

The same code path serves several GPU hosts: only `train.dask_address`
changes (README, "Running on several GPU hosts").
"""

import json
import os
from pathlib import Path

import pytest

from pipelines.core.config import load_config
from pipelines.core.manifest import file_sha256

from conftest import prefect_harness, write_config

pytestmark = pytest.mark.slow


def train_experts_on_dask(tiny_run, tmp_path, **train) -> Path:
    """Train the tiny run's experts from its seed through the moda flow with `train.executor: dask`;
    assert they ran in other processes; return the new run folder."""
    from pipelines.run.flows import moda

    seed = json.loads((tiny_run["run_dir"] / "train" / "registry.json").read_text())["seed"]["checkpoint"]
    config = write_config(tmp_path / "c.yaml", Path(load_config(tiny_run["config"]).synth.out_dir),
                          train={"seed_checkpoint": seed, "baseline": False, "batch_size": 16, "warmup": 2,
                                 "executor": "dask", **train})
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "split"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    with prefect_harness():
        moda(config_path=str(config), run_dir=str(run), stages=["train"])
    ran_on = json.loads((run / "train" / "manifest.json").read_text())["counts"]["experts_ran_on"]
    assert set(ran_on) == {"expert_000", "expert_001"}
    assert all(int(where.rsplit(":", 1)[1]) != os.getpid() for where in ran_on.values())  # not in this process
    return run


def test_experts_train_in_dask_worker_processes_from_the_runs_seed(tiny_run, tmp_path):
    # the cluster named by its class and keyword arguments, as dask_jobqueue.SLURMCluster would be
    run = train_experts_on_dask(tiny_run, tmp_path, dask_cluster="distributed.LocalCluster",
                                dask_cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                                     "dashboard_address": None})
    registry = json.loads((run / "train" / "registry.json").read_text())
    for expert in registry["experts"]:
        weights = f"train/{expert['model_dir']}/open_clip_model.safetensors"
        # the same models as the tiny run trained on this host: where an expert trains (a Dask
        # worker, whose environment says OMP_NUM_THREADS=1) does not change it
        assert file_sha256(run / weights) == file_sha256(tiny_run["run_dir"] / weights), weights


def test_an_unknown_executor_fails_at_load(tmp_path, tiny_data):
    from pipelines.core.config import ConfigError

    with pytest.raises(ConfigError, match="train.executor"):
        load_config(write_config(tmp_path / "c.yaml", tiny_data, train={"executor": "slurm"}))


def test_a_cluster_class_is_an_import_path_with_its_keyword_arguments_and_excludes_an_address(tmp_path, tiny_data):
    import distributed

    from pipelines.core.config import ConfigError, TrainConfig
    from pipelines.run.executors import dask_task_runner

    runner = dask_task_runner(TrainConfig(executor="dask", dask_cluster="distributed.LocalCluster",
                                          dask_cluster_kwargs={"n_workers": 3}))
    assert runner.resolved_cluster_class is distributed.LocalCluster and runner.cluster_kwargs == {"n_workers": 3}
    local = dask_task_runner(TrainConfig(executor="dask", dask_local_workers=4))
    assert local.resolved_cluster_class is distributed.LocalCluster and local.cluster_kwargs["n_workers"] == 4
    assert dask_task_runner(TrainConfig(executor="dask", dask_address="tcp://h:8786")).address == "tcp://h:8786"
    for train, match in (({"dask_cluster": "distributed.LocalCluster", "dask_address": "tcp://h:8786"}, "keep one"),
                         ({"dask_cluster": "SLURMCluster"}, "import path"),
                         ({"dask_cluster_kwargs": ["n_workers"]}, "mapping with string keys")):
        with pytest.raises(ConfigError, match=match):
            load_config(write_config(tmp_path / "c.yaml", tiny_data, train=train))


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two workers started as the README says (`dask scheduler`, `dask worker
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
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(0.1)


def test_experts_train_on_an_existing_dask_cluster_at_dask_address(tiny_run, tmp_path, dask_cluster):
    train_experts_on_dask(tiny_run, tmp_path, dask_address=dask_cluster)


def test_a_train_flow_without_a_dask_runner_keeps_the_experts_on_local_gpu_slots(tiny_data, tmp_path):
    from pipelines.run.executors import on_dask

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_data, train={"executor": "dask"}))
    assert on_dask(cfg.train) is False  # outside a flow run on Dask: no Dask runner, local slots
    assert on_dask(load_config(write_config(tmp_path / "d.yaml", tiny_data)).train) is False
