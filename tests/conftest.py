"""Shared fixtures: tiny data made on the fly, and one tiny end-to-end run."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

def _own_core() -> None:
    """Under pytest-xdist (`make test` runs one worker a core), tie this worker and every process it
    starts to a core of its own. moda sizes torch's threads from the cores a process may use
    (`pipelines.core.devices.usable_cores`), so each worker's trainers then run one thread on their
    own core, never two workers' OpenMP threads spinning on the same two cores (20x slower here)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        count, index = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), int(worker[2:])
        share = max(1, len(cores) // count)  # more workers than cores: some share one, one thread each
        first = (index * share) % len(cores)
        os.sched_setaffinity(0, cores[first:first + share])


_own_core()

# The test modules xdist hands out first under `--dist loadscope`: one that trains the shared tiny
# run, then the two longest that do not need it (the sweep's kill and resume, the GPU suite's smoke
# run). So one worker trains the tiny run while the other works, instead of the second worker to
# reach a tiny-run module waiting ~110 s on its lock, and no long module is left for the end.
FIRST_MODULES = ("tests/serving/test_bundle.py", "tests/pipelines/run/test_sweep.py", "tests/bench/test_gpu_suite.py")


def pytest_xdist_make_scheduler(config, log):
    """xdist's module-per-worker scheduling with FIRST_MODULES at the head of its queue (the rest in
    its own order: the modules with the most tests first)."""
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FirstModulesFirst(LoadScopeScheduling):
        def _assign_work_unit(self, node):
            if not getattr(self, "_reordered", False):
                self._reordered = True
                for scope in reversed(FIRST_MODULES):
                    if scope in self.workqueue:
                        self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return FirstModulesFirst(config, log)


SERVER_STARTUP_SECONDS = 180  # Prefect's default 30 s was seen to run out on a loaded 2-core machine


_SERVER: contextlib.ExitStack | None = None


@contextlib.contextmanager
def prefect_harness():
    """The session's temporary Prefect server for the block: started on first use (given time to
    start on a slow machine) and kept until the session ends, as each start took about 10 s on 2
    cores and eight tests and fixtures need one. Its database holds every test's runs: a test reads
    only the task runs it started (`task_runs_since`)."""
    global _SERVER
    if _SERVER is None:
        from prefect.testing.utilities import prefect_test_harness

        stack = contextlib.ExitStack()
        stack.enter_context(prefect_test_harness(server_startup_timeout=SERVER_STARTUP_SECONDS))
        _SERVER = stack
    yield


def pytest_sessionfinish(session, exitstatus):
    if _SERVER is not None:
        _SERVER.close()


def task_runs_since(started) -> set[str]:
    """The names of the task runs on the session's Prefect server that started after `started`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=started)))
    return {run.name for run in runs}


def now():
    """A timestamp for `task_runs_since`."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)

def stop_processes(procs) -> None:
    """Terminate the servers a test started (last first), killing any that take over 20 s."""
    import subprocess

    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def tar_bytes(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    """A tar of (name, payload) members in this order; payload None makes a directory entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


TINY = {
    "name": "tiny",
    "synth": {"num_train": 240, "shard_size": 80, "eval_per_class": 3, "retrieval_pairs": 8},
    "cluster": {"num_fine": 8, "num_experts": 2, "niter": 10},
    "split": {"shard_size": 60},
    "train": {"seed_epochs": 1, "expert_epochs": 1, "batch_size": 16, "warmup": 2},
    "evaluate": {"batch_size": 64},
    "report": {"seeds": 2, "resamples": 300},  # two trainer seeds: the replicates and their intervals run
}


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_config(path: Path, data_dir: Path, **overrides) -> Path:
    """A YAML config for the tiny set under `data_dir`, with section overrides."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    raw["synth"]["out_dir"] = str(data_dir)
    raw["data"] = {"train_shards": str(data_dir / "train"), "eval_tasks": str(data_dir / "eval"),
                   "val_tasks": str(data_dir / "val")}  # the generator's validation tasks, never the cwd's
    for section, values in overrides.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    path.write_text(yaml.safe_dump(raw))
    return path


def made_once(tmp_path_factory, name: str, make):
    """A session fixture's value made once for the whole test run: in `make`'s own folder, and under
    pytest-xdist once for every worker (the first to ask makes it under a file lock, the others wait
    and read it), so the suite trains the tiny run once however many workers share it. `make(folder)`
    returns a JSON-able dict whose `Path`s are written as strings under keys ending in `_path`."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make(tmp_path_factory.mktemp(name))
    import json
    import shutil

    from filelock import FileLock

    folder = tmp_path_factory.getbasetemp().parent / name
    made = folder.with_name(name + ".json")
    with FileLock(str(folder) + ".lock"):
        if not made.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that died half-way left it
            folder.mkdir()
            value = make(folder)
            made.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in value.items()}))
        value = json.loads(made.read_text())
    return {k: Path(v) if k.endswith("_path") else v for k, v in value.items()}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The synthetic multi-domain set at 240 training pairs (deterministic)."""
    def make(root: Path) -> dict:
        from pipelines.core.config import load_config
        from pipelines.synth.generate import generate

        generate(load_config(write_config(root / "tiny.yaml", root / "data")).synth)
        return {"data_path": root / "data"}

    return made_once(tmp_path_factory, "tiny_data", make)["data_path"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> dict:
    """One end-to-end run of the `moda` flow under a temporary Prefect server (made once: `made_once`).
    Tests read it, or copy or link its folders into runs of their own: none changes it."""
    def make(root: Path) -> dict:
        from pipelines.run.flows import moda

        config = write_config(root / "tiny.yaml", tiny_data)
        with prefect_harness():
            started = time.perf_counter()
            table = moda(config_path=str(config), run_dir=str(root / "run"))
            seconds = time.perf_counter() - started
        return {"config_path": config, "run_path": root / "run", "table": table, "seconds": seconds}

    made = made_once(tmp_path_factory, "tiny_run", make)
    return {"config": made["config_path"], "run_dir": made["run_path"], "table": made["table"],
            "seconds": made["seconds"]}


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free loopback port, the AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    from pipelines.run.demo import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(key, value)
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps one per process: an earlier test's endpoint
    fs = fsspec.filesystem("s3")
    if not fs.exists("evalsets"):  # moto keeps its buckets per process, across servers
        fs.mkdir("evalsets")
    yield fs
    server.stop()


def upload(fs, local: Path, remote: str) -> None:
    """Every file under `local` to the store's folder `remote` (no scheme), as it lies."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe(f"{remote}/{path.relative_to(local).as_posix()}", path.read_bytes())
