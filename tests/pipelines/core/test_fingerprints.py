"""Fingerprints hash what changes results, never how a stage runs."""

import dataclasses
import json
import os
import shutil

import pytest

from experts.train import STAGE as train_stage
from experts.train import fingerprint as train_fingerprint
from pipelines.core.config import Config, DaskConfig, TrainConfig, is_run_only, load_config, section_hash
from pipelines.core.manifest import atomic_write_json
from pipelines.run.stages import NAMES, context, run_stage, stage_done

pytestmark = pytest.mark.slow

HOW_IT_RUNS = {  # fields that change where and how fast a stage runs, not what it writes
    "embed": {"processes": 3, "device": "cpu"},
    "split": {"processes": 3},
    "train": {"device": "cpu", "grad_checkpointing": True},
    "evaluate": {"batch_size": 7, "device": "cpu"},
}


# ... and the run's executor, which no section holds
ELSEWHERE = {"executor": "dask", "dask": DaskConfig(address="tcp://elsewhere:8786", local_workers=7,
                                                   workers_timeout_s=5.0)}


def changed(cfg, top=None, **sections):
    return dataclasses.replace(cfg, **(top or {}), **{name: dataclasses.replace(getattr(cfg, name), **fields)
                                                      for name, fields in sections.items()})


def test_the_run_only_fields_are_marked_and_left_out_of_the_section_hash():
    for section, fields in HOW_IT_RUNS.items():
        for name in fields:
            assert is_run_only(getattr(Config(), section), name), (section, name)
    assert all(is_run_only(DaskConfig(), f.name) for f in dataclasses.fields(DaskConfig))
    on_dask = dataclasses.replace(Config(), **ELSEWHERE)
    assert all(section_hash(getattr(on_dask, f.name)) == section_hash(getattr(Config(), f.name))
               for f in dataclasses.fields(Config) if dataclasses.is_dataclass(getattr(Config(), f.name))
               and f.name != "dask")
    assert section_hash(TrainConfig(lr=1e-3)) != section_hash(TrainConfig())


def test_changing_how_the_stages_run_reruns_nothing(tiny_run):
    cfg = changed(load_config(tiny_run["config"]), ELSEWHERE, **HOW_IT_RUNS)
    assert {name: stage_done(name, cfg, tiny_run["run_dir"]) for name in NAMES} == dict.fromkeys(NAMES, True)


def test_changing_the_learning_rate_reruns_train_and_then_evaluate_only(tiny_run, tmp_path):
    cfg = changed(load_config(tiny_run["config"]), train={"lr": 1e-3})
    done = {name: stage_done(name, cfg, tiny_run["run_dir"]) for name in NAMES}
    assert done == {"embed": True, "cluster": True, "split": True, "train": False, "evaluate": True,
                    "report": True}
    # evaluate keys on the train stage's manifest: once train has rerun (its new fingerprint
    # recorded), evaluate is due too, and nothing upstream of train is
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run, symlinks=True, copy_function=os.link)
    manifest = json.loads((run / "train" / "manifest.json").read_text())
    fingerprint = train_fingerprint(context(train_stage, cfg, run)).value
    atomic_write_json(run / "train" / "manifest.json", {**manifest, "fingerprint": fingerprint})
    done = {name: stage_done(name, cfg, run) for name in NAMES}
    assert done == {"embed": True, "cluster": True, "split": True, "train": True, "evaluate": False,
                    "report": True}  # report keys on evaluate's manifest, which has not changed yet


def test_switching_the_executor_discards_no_checkpoint(tiny_run, tmp_path):
    """The train stage made to run again (its manifest gone) under another executor, device and
    checkpointing reuses every model's checkpoints: no trainer is launched."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run, symlinks=True, copy_function=os.link)  # hard links: no copy
    (run / "train" / "manifest.json").unlink()
    launches = {m: (run / "train" / f"{m}.log").read_text().count("$ ")
                for m in ("seed", "expert_000", "expert_001", "baseline")}
    cfg = changed(load_config(tiny_run["config"]), ELSEWHERE, train={"device": "cpu", "grad_checkpointing": True})
    manifest = run_stage("train", cfg, run)
    assert not manifest.get("skipped")
    assert {m: (run / "train" / f"{m}.log").read_text().count("$ ") for m in launches} == launches
    original = load_config(tiny_run["config"])
    assert stage_done("train", original, run) and stage_done("evaluate", original, run)
