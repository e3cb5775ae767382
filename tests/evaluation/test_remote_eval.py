"""Evaluation sets behind URLs: read from a real S3 API on loopback (moto's server), mirrored once,
scored exactly as the same folder on local disk."""

import json
import os
import shutil

import pytest

from pipelines.core.config import load_config
from pipelines.run.stages import run_stage
from pipelines.shardio.remote import RemoteError, mirror

from conftest import upload

pytestmark = pytest.mark.slow


def test_an_s3_task_folder_is_scored_as_the_same_folder_on_disk_and_fetched_once(s3, tiny_run, tiny_data, tmp_path):
    local = tmp_path / "tasks"
    shutil.copytree(tiny_data / "eval" / "digits", local / "digits")
    shutil.copytree(tiny_data / "eval" / "retrieval", local / "retrieval")
    upload(s3, local, "evalsets/tasks")
    scores = {}
    for name, spec in (("local", str(local)), ("s3", "s3://evalsets/tasks")):
        run = tmp_path / name
        run.mkdir()
        for stage in ("embed", "cluster", "train"):
            os.symlink(tiny_run["run_dir"] / stage, run / stage)
        cfg = load_config(tiny_run["config"], overrides={"data": {"eval_tasks": spec, "val_tasks": ""}})
        run_stage("evaluate", cfg, run)
        scores[name] = json.loads((run / "evaluate" / "results.json").read_text())["tasks"]
    assert scores["s3"] == scores["local"]
    copy = next((tmp_path / "s3" / "cache" / "remote").glob("*/tasks"))
    stamp = (copy / "digits" / "task.json").stat().st_mtime_ns
    assert mirror("s3://evalsets/tasks", tmp_path / "s3" / "cache" / "remote") == copy
    assert (copy / "digits" / "task.json").stat().st_mtime_ns == stamp  # unchanged remote: nothing fetched


def test_a_changed_remote_file_is_fetched_again(s3, tmp_path):
    s3.pipe("evalsets/one/a.txt", b"first")
    copy = mirror("s3://evalsets/one", tmp_path)
    assert (copy / "a.txt").read_bytes() == b"first"
    s3.pipe("evalsets/one/a.txt", b"second!")
    assert (mirror("s3://evalsets/one", tmp_path) / "a.txt").read_bytes() == b"second!"


def test_a_url_with_nothing_behind_it_is_an_error_naming_it(s3, tmp_path):
    with pytest.raises(RemoteError, match="s3://evalsets/absent: no files there"):
        mirror("s3://evalsets/absent", tmp_path)
