"""`executor: dask` on a real SLURM: a one-node cluster (Debian's slurmctld, slurmd and munge,
started here as root), Dask workers submitted by `dask_jobqueue.SLURMCluster` as sbatch jobs, and
the embed and train stages' jobs run in them.

Skips, saying why, where SLURM is not installed (`.ci/run` installs it:
`apt-get install slurmd slurmctld munge`), not root, or will not start.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.core.config import load_config
from pipelines.core.manifest import file_sha256

from conftest import now, prefect_harness, stop_processes, task_runs_since, write_config

pytestmark = pytest.mark.slow

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}


def _missing() -> str | None:
    """Why SLURM cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to start munged, slurmctld and slurmd"
    absent = [name for name, path in DAEMONS.items() if not Path(path).is_file()]
    absent += [name for name in ("sbatch", "sinfo", "squeue") if shutil.which(name) is None]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing): apt-get install slurmd slurmctld munge"
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed (pip install -e '.[test]')"
    return None


# .ci/run installs SLURM and sets this: there a test that cannot start SLURM fails instead of
# skipping, so a broken install or daemon cannot pass CI as a skip.
REQUIRED = os.environ.get("MODA_REQUIRE_SLURM") == "1"


def _cannot_run(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"MODA_REQUIRE_SLURM=1 (.ci/run installed SLURM) but: {why}")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path, host: str) -> Path:
    cpus = os.cpu_count() or 2
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=moda-test", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "AuthType=auth/munge",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "ReturnToService=2",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill",
        "SlurmdTimeout=60", "InactiveLimit=0", "KillWait=5", "MinJobAge=30",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=8000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    return conf


@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM on this host for the module; `SLURM_CONF` set; stopped afterwards."""
    why = _missing()
    if why:
        _cannot_run(why)
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="moda-slurm-"))
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = _slurm_conf(root, host)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = []
    try:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        if not Path("/etc/munge/munge.key").is_file():
            subprocess.run(["/usr/sbin/mungekey", "--create"], check=True, capture_output=True)
        procs.append(subprocess.Popen([DAEMONS["munged"], "--foreground", "--force"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        time.sleep(1)
        procs.append(subprocess.Popen([DAEMONS["slurmctld"], "-D", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([DAEMONS["slurmd"], "-D", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline, state = time.time() + 60, ""
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            if state in ("idle", "mix", "alloc"):
                break
            time.sleep(1)
        else:
            logs = "".join((root / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log")
                           if (root / f).is_file())
            _cannot_run(f"SLURM did not start (node state {state!r}):\n{logs}")
        os.environ["SLURM_CONF"] = str(conf)
        yield root
    finally:
        os.environ.pop("SLURM_CONF", None)
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        stop_processes(procs)
        shutil.rmtree(root, ignore_errors=True)


def test_embed_and_train_run_in_slurm_jobs_through_dask_jobqueue(slurm, tiny_run, tmp_path):
    from pipelines.run.flows import moda

    seed = json.loads((tiny_run["run_dir"] / "train" / "registry.json").read_text())["seed"]["checkpoint"]
    kwargs = {"n_workers": 2, "cores": 1, "processes": 1, "memory": "3GB", "walltime": "00:30:00",
              "python": sys.executable, "log_directory": str(tmp_path / "slurm-logs"),
              "local_directory": str(tmp_path / "dask-scratch"), "worker_extra_args": ["--resources", "GPU=1"]}
    config = write_config(tmp_path / "c.yaml", Path(load_config(tiny_run["config"]).synth.out_dir),
                          train={"seed_checkpoint": seed, "baseline": False, "batch_size": 16, "warmup": 2},
                          report={"seeds": 1}, executor="dask",
                          dask={"cluster": "dask_jobqueue.SLURMCluster", "cluster_kwargs": kwargs})
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("cluster", "split"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    with prefect_harness():
        started = now()
        moda(config_path=str(config), run_dir=str(run), stages=["embed", "train"])
        jobs = task_runs_since(started)
    assert "embed-0" in jobs and {"expert_000", "expert_001"} <= jobs, jobs
    assert any((tmp_path / "slurm-logs").glob("*.err")) or any((tmp_path / "slurm-logs").glob("*.out"))
    ran_on = json.loads((run / "train" / "manifest.json").read_text())["counts"]["experts_ran_on"]
    assert all(int(where.rsplit(":", 1)[1]) != os.getpid() for where in ran_on.values())
    embedded = json.loads((run / "embed" / "manifest.json").read_text())["outputs"]
    assert embedded == json.loads((tiny_run["run_dir"] / "embed" / "manifest.json").read_text())["outputs"]
    registry = json.loads((run / "train" / "registry.json").read_text())
    for expert in registry["experts"]:
        weights = f"train/{expert['model_dir']}/open_clip_model.safetensors"
        assert file_sha256(run / weights) == file_sha256(tiny_run["run_dir"] / weights), weights
