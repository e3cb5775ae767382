"""A Prefect server that dies in the middle of a run loses no finished stage.

The run folder's files and manifests are the source of truth, not Prefect's
database: after the server is killed and restarted, the rerun skips every
stage that had finished (its manifest is left byte for byte as it was).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines.run.demo import demo_env, free_port, start_server, stop

from conftest import write_config

pytestmark = pytest.mark.slow

STAGES = ("embed", "cluster", "split")


def moda_run(config, run_dir, env):
    return subprocess.Popen([sys.executable, "-m", "pipelines.run.cli", "run", str(config), "--run-dir", str(run_dir),
                             "--stages", ",".join(STAGES)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_a_server_killed_mid_run_and_restarted_loses_no_finished_stage(tmp_path, tiny_data):
    config = write_config(tmp_path / "c.yaml", tiny_data)
    env = demo_env(tmp_path, free_port()) | {"PREFECT_CLIENT_MAX_RETRIES": "1"}
    run_dir = tmp_path / "run"
    server = start_server(env, tmp_path, tmp_path / "server1.log")
    try:
        proc = moda_run(config, run_dir, env)
        deadline = time.time() + 300
        while not (run_dir / "cluster" / "manifest.json").is_file() and proc.poll() is None:
            assert time.time() < deadline, "embed and cluster did not finish in 5 minutes"
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)  # the server dies while the flow is still running
        server.wait()
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:  # a client still retrying is killed too
            proc.kill()
            proc.wait()
    finally:
        stop(server, "server")
    finished = {s: (run_dir / s / "manifest.json").read_bytes() for s in STAGES
                if (run_dir / s / "manifest.json").is_file()}
    assert {"embed", "cluster"} <= set(finished)

    server = start_server(env, tmp_path, tmp_path / "server2.log")  # same database, restarted
    try:
        rerun = moda_run(config, run_dir, env)
        assert rerun.wait(timeout=600) == 0
    finally:
        stop(server, "server")
    for stage, manifest in finished.items():
        assert (run_dir / stage / "manifest.json").read_bytes() == manifest, f"{stage} was redone"
    assert (run_dir / "split" / "manifest.json").is_file()


def test_prefect_flow_run_retry_continues_a_failed_run_without_redoing_its_finished_stages(tmp_path, tiny_data):
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    config = write_config(tmp_path / "c.yaml", tiny_data, cluster={"num_fine": 100000, "num_experts": 2})
    env = demo_env(tmp_path, free_port())
    run_dir = tmp_path / "run"
    server = start_server(env, tmp_path, tmp_path / "server.log")
    try:
        failed = subprocess.run([sys.executable, "-m", "pipelines.run.cli", "run", str(config), "--run-dir",
                                 str(run_dir), "--stages", "embed,cluster"], env=env, cwd=root,
                                capture_output=True, text=True)
        assert failed.returncode == 2 and "num_fine=100000" in failed.stderr  # embed done, cluster failed
        embed_manifest = (run_dir / "embed" / "manifest.json").read_bytes()
        run_id = subprocess.run([sys.executable, "-c", (
            "from prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStateType\n"
            "with get_client(sync_client=True) as client:\n"
            "    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(\n"
            "        state=dict(type=FlowRunFilterStateType(any_=['FAILED']))))\n"
            "    print([str(r.id) for r in runs if r.parameters.get('stages')][0])")],
            env=env, cwd=root, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        write_config(config, tiny_data)  # the user fixes the config (same file) ...
        retried = subprocess.run([str(Path(sys.executable).parent / "prefect"), "flow-run", "retry", run_id,
                                  "--entrypoint", "pipelines/run/flows.py:moda"], env=env, cwd=root,
                                 capture_output=True, text=True, timeout=600)  # ... and retries the run
        assert retried.returncode == 0, retried.stdout[-2000:] + retried.stderr[-2000:]
    finally:
        stop(server, "server")
    assert (run_dir / "embed" / "manifest.json").read_bytes() == embed_manifest  # not redone
    assert json.loads((run_dir / "cluster" / "manifest.json").read_text())["counts"]["samples"] == 240
