"""Live progress (`make demo`, `moda run`): which stage runs, how far it is and for how long, read
from the run folder the stages write as they go, wherever they run."""

import json
import time

from pipelines.core.layout import RunLayout
from pipelines.run.progress import StageState, Watcher, describe, snapshot


def finished(layout: RunLayout, stage: str, seconds: float) -> None:
    layout.stage(stage).mkdir(parents=True, exist_ok=True)
    layout.manifest(stage).write_text(json.dumps({"stage": stage, "seconds": seconds}))


def test_each_stage_is_done_running_with_its_progress_or_waiting(tmp_path):
    layout = RunLayout(tmp_path / "run")
    finished(layout, "embed", 12.3)
    finished(layout, "cluster", 2.0)
    layout.input_records.mkdir(parents=True)
    layout.output_records.mkdir(parents=True)
    for i in range(3):
        (layout.input_records / f"{i:05d}.json").write_text("{}")
    (layout.output_records / "000_00000.json").write_text("{}")
    states = {s.name: s for s in snapshot(layout)}
    assert (states["embed"].state, states["embed"].seconds) == ("done", 12.3)
    assert states["split"] == StageState("split", "running", "3 input shard(s) read, 1 expert shard(s) written")
    assert [states[n].state for n in ("train", "evaluate", "report")] == ["waiting"] * 3


def test_training_shows_the_models_trained_and_the_newest_log_s_epoch(tmp_path):
    layout = RunLayout(tmp_path / "run")
    (layout.model("seed")).mkdir(parents=True)
    (layout.model("seed") / "open_clip_model.safetensors").write_bytes(b"x")
    layout.trainer_log("seed").write_text("Train Epoch: 1 [ 512/4000 (13%)]\n")
    time.sleep(0.01)
    layout.trainer_log("expert_001").write_text("... Train Epoch: 2 [1024/1000 (50%)] Data (t): 0.1\n"
                                                "Train Epoch: 2 [2048/1000 (100%)] Data (t): 0.1\n")
    (train,) = [s for s in snapshot(layout) if s.name == "train"]
    assert train.detail == "1 model(s) trained; expert_001 epoch 2, 2048/1000 samples"


def test_one_line_says_what_finished_in_how_long_what_runs_and_what_waits():
    states = [StageState("embed", "done", seconds=12.3, finished_at=50.0),
              StageState("cluster", "done", seconds=2.0, finished_at=150.0),
              StageState("split", "running", "3 input shard(s) read"), StageState("train", "waiting"),
              StageState("evaluate", "waiting")]
    line = describe(states, since=100.0, running_since={"split": 190.0}, now=200.0)
    assert line == ("embed done earlier | cluster done in 2 s | split running 10 s: 3 input shard(s) read | "
                    "2 stage(s) waiting")


def test_the_watcher_prints_a_line_only_when_something_changed(tmp_path):
    layout = RunLayout(tmp_path / "run")
    lines = []
    watcher = Watcher(layout, interval=60, emit=lines.append, prefix="")
    watcher.poll()
    watcher.poll()  # nothing changed: no second line
    layout.embed.mkdir(parents=True)
    (layout.embed / "00000.done.json").write_text("{}")
    watcher.poll()
    finished(layout, "embed", 4.0)
    watcher.poll()
    assert lines == ["6 stage(s) waiting", "embed running 0 s: 1 input shard(s) embedded | 5 stage(s) waiting",
                     "embed done in 4 s | 5 stage(s) waiting"]
