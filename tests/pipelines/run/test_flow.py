"""The `moda` flow end to end under a temporary Prefect server, and its CLI."""

import json
import time

import pytest

from pipelines.core.config import load_config
from pipelines.run.cli import main as cli_main
from pipelines.run.stages import NAMES as STAGES
from pipelines.run.stages import check_inputs

from conftest import prefect_harness

pytestmark = pytest.mark.slow

ROWS = ["seed", "baseline", "expert_000", "expert_001", "uniform ensemble", "routed ensemble",
        "routed, released formula", "routed by coarse centres", "oracle best expert"]


def test_every_stage_writes_a_manifest(tiny_run):
    for stage in STAGES:
        manifest = json.loads((tiny_run["run_dir"] / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["fingerprint"]


def test_results_have_every_row_for_every_held_out_task(tiny_run):
    results = json.loads((tiny_run["run_dir"] / "evaluate" / "results.json").read_text())
    assert set(results["tasks"]) == {"shapes", "digits", "textures", "scenes", "retrieval"}
    assert results["rows"] == ROWS
    for task in results["tasks"].values():
        if task["kind"] == "classification":  # top-5 only with 5 classes or more, as clip_benchmark
            metrics = ["top1", "mean_per_class"] + (["top5"] if task["num_classes"] >= 5 else [])
            assert all((task[row]["top5"] is None) == (task["num_classes"] < 5) for row in ROWS)
        else:  # 8 images: recall@1 and @5 both ways
            metrics = ["i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"]
        for row in ROWS:
            assert all(0.0 <= task[row][m] <= 1.0 for m in metrics)
        assert sum(task["routing_weights"]) == pytest.approx(1.0)
    for row in ROWS[:-1]:  # the report: every compared row (the oracle is no competitor)
        assert f"| {row} |" in tiny_run["table"]


def test_the_report_states_each_verdict_with_its_interval_over_both_trainer_seeds(tiny_run):
    run = tiny_run["run_dir"]
    report = json.loads((run / "report" / "report.json").read_text())
    first = json.loads((run / "evaluate" / "results.json").read_text())
    second = json.loads((run / "seeds" / "replicate_1" / "evaluate" / "results.json").read_text())
    assert report["seeds"] == 2 and tiny_run["table"].startswith("# MoDE against the fair single model")
    for name, task in first["tasks"].items():
        metric = "top1" if task["kind"] == "classification" else "i2t_r1"
        routed = report["table"]["routed ensemble"][name]
        mean = (task["routed ensemble"][metric] + second["tasks"][name]["routed ensemble"][metric]) / 2
        assert routed["mean"] == pytest.approx(mean)
        interval = routed["vs_baseline"]
        assert interval["low"] <= interval["mean"] <= interval["high"] and interval["seeds"] == 2
        word = "beat" if interval["low"] > 0 else "lost" if interval["high"] < 0 else "no significant difference"
        # (two seeds: the words of a result; one seed would say "ahead" or "behind", tests/reporting/test_stats.py)
        assert f"- {name}: {word}: {interval['mean'] * 100:+.1f} [" in tiny_run["table"]
    for plot in ("evaluate/routing_weights.png", "evaluate/accuracy.png", "report/differences.png"):
        assert (run / plot).read_bytes()[:4] == b"\x89PNG"


def test_the_other_trainer_seed_trains_other_models_on_the_same_data(tiny_run):
    run = tiny_run["run_dir"]
    replica = run / "seeds" / "replicate_1"
    assert (replica / "split").resolve() == (run / "split").resolve()  # shared, not split again
    for model in ("seed", "expert_000", "baseline"):
        weights = f"train/{model}/open_clip_model.safetensors"
        assert (replica / weights).read_bytes() != (run / weights).read_bytes(), model
    assert json.loads((replica / "train" / "registry.json").read_text())["trainer_seed"] == 1


def test_routing_log_names_each_class_nearest_fine_cluster(tiny_run):
    routing = json.loads((tiny_run["run_dir"] / "evaluate" / "routing.json").read_text())
    entry = routing["shapes"]["metadata"][0]
    assert entry["text"] == "circle" and 0 <= entry["nearest_fine"] < 8 and entry["distance"] > 0
    assert len(routing["retrieval"]["query_weights"]) == 8  # one weight vector per query caption


def test_samples_are_conserved_from_embed_to_split(tiny_run):
    run = tiny_run["run_dir"]
    embed = json.loads((run / "embed" / "manifest.json").read_text())["counts"]
    split = json.loads((run / "split" / "manifest.json").read_text())["counts"]
    assert embed["samples_in"] == 240 == split["samples_in"]
    assert sum(split["experts"]) + sum(split["rejected"].values()) == 240


def test_a_second_run_skips_every_stage(tiny_run):
    from pipelines.run.flows import STAGE_FLOWS

    before = {s: (tiny_run["run_dir"] / s / "manifest.json").read_text() for s in STAGES}
    with prefect_harness():
        results = [STAGE_FLOWS[s](str(tiny_run["config"]), str(tiny_run["run_dir"])) for s in STAGES]
    assert all(r.get("skipped") for r in results)
    after = {s: (tiny_run["run_dir"] / s / "manifest.json").read_text() for s in STAGES}
    assert before == after


def test_missing_training_data_fails_before_any_work(tmp_path):
    from conftest import write_config

    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="nothing/train"):
        check_inputs(cfg)


def test_a_validation_folder_that_is_not_there_fails_before_any_work_and_empty_means_none(tmp_path, tiny_data):
    """A mistyped `data.val_tasks` used to mean, silently, "no validation": lambda from the config."""
    from conftest import write_config

    missing = load_config(write_config(tmp_path / "c.yaml", tiny_data, data={"val_tasks": str(tmp_path / "nope")}))
    with pytest.raises(FileNotFoundError, match=r"data.val_tasks: folder .*nope not found .*\"\" for none"):
        check_inputs(missing)
    check_inputs(load_config(write_config(tmp_path / "d.yaml", tiny_data, data={"val_tasks": ""})))


def test_cli_reports_a_bad_config_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {num_fine: 2, num_experts: 4}\n")
    assert cli_main(["run", str(bad)]) == 2
    assert "num_fine (2) must be >= cluster.num_experts (4)" in capsys.readouterr().err


def test_a_second_full_run_skips_every_stage_and_does_no_heavy_work(tiny_run):
    # The flow checks each stage's fingerprint before it starts a sub-flow, so a
    # finished stage costs a few file reads, not a Prefect sub-flow run (about
    # 1.2 s each on 2 cores).
    from pipelines.run.flows import moda

    before = {s: (tiny_run["run_dir"] / s / "manifest.json").read_text() for s in STAGES}
    with prefect_harness():
        started = time.perf_counter()
        table = moda(config_path=str(tiny_run["config"]), run_dir=str(tiny_run["run_dir"]))
        seconds = time.perf_counter() - started
    assert table == tiny_run["table"]
    assert {s: (tiny_run["run_dir"] / s / "manifest.json").read_text() for s in STAGES} == before
    assert seconds < 0.1 * tiny_run["seconds"], (seconds, tiny_run["seconds"])
