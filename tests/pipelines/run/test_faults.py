"""Fault injection: a stage SIGKILLed at several points, then rerun, ends as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clustering.embed import GROUP_SHARDS
from pipelines.core.config import load_config
from pipelines.core.devices import cpu_threads
from pipelines.core.manifest import file_sha256
from pipelines.run.stages import run_stage
from pipelines.synth.generate import generate

from conftest import write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """600 synthetic pairs in 20 input shards (3 embed groups of up to 8), and a reference run of
    embed and cluster (cluster in a fresh process, as every run it is compared with)."""
    root = tmp_path_factory.mktemp("faults")
    config = write_config(root / "c.yaml", root / "data",
                          synth={"num_train": 600, "shard_size": 30, "eval_per_class": 1, "retrieval_pairs": 4},
                          cluster={"num_fine": 16, "num_experts": 4, "niter": 10})
    cfg = load_config(config)
    generate(cfg.synth)
    run_stage("embed", cfg, root / "reference")
    moda_stage(config, "cluster", root / "reference")
    return config, cfg, root


def moda_stage(config, stage, run) -> None:
    """`moda stage <stage>` in a new process, as a user reruns it."""
    subprocess.run([sys.executable, "-m", "pipelines.run.cli", "stage", stage, str(config), "--run-dir", str(run)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def outputs(stage_dir, pattern):
    return {p.name: file_sha256(p) for p in sorted(stage_dir.glob(pattern))}


def kill_when(config, stage, run, ready) -> bool:
    """Run `moda stage <stage>` in a subprocess (its output to run/<stage>.out), SIGKILL it once
    `ready()` (a sign of real work done: a progress marker or a progress line), and return True if
    the kill cut it short (no manifest). A run that ended before `ready()` fails the test: every kill
    must land after work started."""
    run.mkdir(parents=True, exist_ok=True)
    log = run / f"{stage}.out"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.run.cli", "stage", stage, str(config),
                                 "--run-dir", str(run)], stdout=sink, stderr=subprocess.STDOUT)
        fired = False
        while proc.poll() is None:
            if ready():
                os.kill(proc.pid, signal.SIGKILL)
                fired = True
                break
            time.sleep(0.01)
        proc.wait()
    assert fired, f"{stage} ended before the kill's progress marker appeared: {log.read_text()[-500:]}"
    return not (run / stage / "manifest.json").is_file()


def mtimes(paths) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in paths}


@pytest.mark.slow
def test_a_killed_embed_resumes_at_the_unfinished_shards(data):
    config, cfg, root = data
    expected = outputs(root / "reference" / "embed", "0*.parquet")
    stems = [f"{i:05d}" for i in range(20)]
    groups = [stems[i:i + GROUP_SHARDS] for i in range(0, 20, GROUP_SHARDS)]  # the unit of work: one encode()
    for point, done in enumerate([1, 9]):
        run = root / f"embed_killed_{point}"
        assert kill_when(config, "embed", run, lambda: len(list((run / "embed").glob("*.done.json"))) >= done)
        marked = {m.name.split(".")[0] for m in (run / "embed").glob("*.done.json")}
        assert done <= len(marked) < 20  # the kill came after real work and left work to do
        finished = mtimes(run / "embed" / f"{stem}{suffix}" for group in groups if set(group) <= marked
                          for stem in group for suffix in (".done.json", ".parquet"))
        assert finished or done < GROUP_SHARDS  # from the second kill on, a whole group was done
        resumed = run_stage("embed", cfg, run)
        assert outputs(run / "embed", "0*.parquet") == expected
        assert resumed["counts"]["samples_in"] == 600
        assert mtimes(Path(p) for p in finished) == finished  # finished groups were not embedded again


@pytest.mark.slow
def test_a_killed_cluster_reruns_to_the_same_outputs(data):
    config, _, root = data
    expected = outputs(root / "reference" / "cluster", "*.npy") | outputs(root / "reference" / "cluster",
                                                                         "assignments.parquet")
    for point, line in enumerate(["fine centres fitted", "experts formed"]):
        run = root / f"cluster_killed_{point}"
        run.mkdir()
        os.symlink(root / "reference" / "embed", run / "embed")
        log = run / "cluster.out"
        assert kill_when(config, "cluster", run, lambda: log.is_file() and line in log.read_text())
        assert line in log.read_text()  # the kill came after that much work
        # Rerun in a new process, as after a real kill: the pytest process carries state
        # (thread pools, allocator) from a hundred earlier tests that no user rerun has.
        moda_stage(config, "cluster", run)
        got = outputs(run / "cluster", "*.npy") | outputs(run / "cluster", "assignments.parquet")
        assert got == expected
        assert not list((run / "cluster").glob("*.tmp*"))  # no partial file left behind


@pytest.mark.slow
def test_a_killed_evaluate_reruns_to_the_same_results(tiny_run, tmp_path):
    import shutil

    reference = tiny_run["run_dir"] / "evaluate"
    names = ("results.json", "routing.json", "results.md")
    expected = {name: file_sha256(reference / name) for name in names}
    for point, features in enumerate([1, 4]):
        run = tmp_path / f"evaluate_killed_{point}"
        # without the run's image-feature cache: the killed evaluate computes them (its progress marker)
        shutil.copytree(tiny_run["run_dir"], run, symlinks=True, ignore=shutil.ignore_patterns("evaluate", "cache"))
        cache = run / "cache" / "image_features"
        assert kill_when(tiny_run["config"], "evaluate", run, lambda: len(list(cache.glob("*.npy"))) >= features)
        kept = mtimes(sorted(cache.glob("*.npy")))
        assert len(kept) >= features
        # A long-lived process may hold another thread count than the reference ran with (an
        # earlier stage, Dask's OMP_NUM_THREADS=1): the stage pins its own, so this cannot matter.
        torch.set_num_threads(1 if cpu_threads() > 1 else 2)
        run_stage("evaluate", load_config(tiny_run["config"]), run)
        assert {name: file_sha256(run / "evaluate" / name) for name in names} == expected
        assert not list((run / "evaluate").glob(".*.tmp"))
        assert mtimes(Path(p) for p in kept) == kept  # features computed before the kill were not again
