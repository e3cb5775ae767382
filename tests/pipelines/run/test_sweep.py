"""The scaling sweep (`moda sweep`): its grid, its statistics on points that follow a known law, and
a two-point sweep on CPU that is killed, resumed without retraining what finished, and summarised."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experts.launch import allowed_gpus
from pipelines.core.config import ConfigError, load_config, section_hash
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import file_sha256
from pipelines.run.sweep import gpu_shares, model_slug, on_share, plan, points, systems, waves
from reporting.scaling import PowerLaw, interval
from reporting.scaling_stage import compare, error_draws, fit_system
from reporting.scaling_tables import scaling_markdown, verdict

from conftest import prefect_harness, write_config

ROOT = Path(__file__).resolve().parents[3]


def sweep_config(tmp_path, data, **sweep):
    return write_config(tmp_path / "sweep.yaml", data, sweep=sweep, report={"seeds": 1, "resamples": 200})


def test_every_model_meets_every_budget_with_the_seed_taking_its_share(tmp_path, tiny_data):
    cfg = load_config(sweep_config(tmp_path, tiny_data, models=["experts/model_configs/moda-micro.json", "ViT-B-32"],
                                   epochs=[8, 4], seed_share=0.25, experts=[2, 3]))
    grid = points(cfg, {"train": {"lr": 0.001}})
    assert [(p.name, p.seed_epochs) for p in grid] == [("moda-micro-e4", 1), ("moda-micro-e8", 2),
                                                        ("ViT-B-32-e4", 1), ("ViT-B-32-e8", 2)]
    first = grid[0]
    assert first.overrides["train"] == {"lr": 0.001, "model": "experts/model_configs/moda-micro.json",
                                        "seed_epochs": 1, "expert_epochs": 3, "baseline": True,
                                        "seed_checkpoint": ""}
    assert first.overrides["evaluate"]["ablations"] == ["experts=3"]  # 2 is the run's own cluster.num_experts
    assert systems(cfg) == {"single model": "baseline", "MoDE-2": "routed ensemble",
                            "MoDE-3": "MoDE-3 routed ensemble"}


def test_budgets_the_seed_share_cannot_split_into_whole_epochs_are_refused(tmp_path, tiny_data):
    with pytest.raises(ConfigError, match="whole number"):
        load_config(sweep_config(tmp_path, tiny_data, epochs=[2, 3], seed_share=0.5))
    with pytest.raises(ConfigError, match="must include cluster.num_experts"):
        load_config(sweep_config(tmp_path, tiny_data, experts=[3, 4]))


def test_a_model_name_becomes_a_folder_name():
    assert model_slug("experts/model_configs/moda-tiny.json") == "moda-tiny"
    assert model_slug("local-dir:/models/my model/") == "my-model"
    assert model_slug("ViT-B-32") == "ViT-B-32"


def test_points_trained_at_once_get_disjoint_shares_of_the_gpus():
    assert gpu_shares(["0", "1", "2", "3"], 2, 1) == [["0", "1"], ["2", "3"]]
    assert gpu_shares(["0", "1", "2", "3"], 1, 1) == [["0", "1", "2", "3"]]
    assert gpu_shares([], 2, 1) == [[], []]  # a CPU host: no GPU to share
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        gpu_shares(["0", "1", "2"], 2, 2)
    assert waves([1, 2, 3], 2) == [[1, 2], [3]]


def test_a_gpu_share_changes_how_a_point_runs_not_its_fingerprints(tmp_path, tiny_data):
    cfg = load_config(sweep_config(tmp_path, tiny_data))
    point = points(cfg)[0]
    shared = on_share(point, ["3"], visible=["2", "3"])  # CUDA_VISIBLE_DEVICES=2,3: torch's cuda:1
    assert shared.overrides["train"]["gpus"] == ["3"] and shared.overrides["evaluate"]["device"] == "cuda:1"
    assert shared.overrides["evaluate"]["ablations"] == point.overrides["evaluate"]["ablations"]
    config = tmp_path / "sweep.yaml"
    for section in ("train", "evaluate"):
        hashes = {section_hash(getattr(load_config(config, p.overrides), section)) for p in (point, shared)}
        assert len(hashes) == 1
    assert allowed_gpus(["0", "1"], ["1"]) == ["1"] and allowed_gpus(["0", "1"], []) == ["0", "1"]
    with pytest.raises(ValueError, match="not among the visible GPUs"):
        allowed_gpus(["0"], ["3"])


SINGLE_LAW = PowerLaw(a=0.5, alpha=0.4, e_inf=0.1, c0=1e12)
BUDGETS = np.geomspace(1e12, 6.4e13, 4)


def hits_following(law, compute, samples, rng):
    """(points, samples) hits of a model whose error at each compute is the law's."""
    return (rng.random((len(compute), samples)) >= law(compute)[:, None]).astype(float)


def measured_difference(difference, draws, compute, confidence):
    """The error difference at the largest compute with its paired-redraw interval (what a point's
    report states, there over trainer seeds too)."""
    top = int(np.argmax(compute))
    return {"compute": float(compute[top]), "value": float(difference[top]),
            "interval": interval(draws[:, top], confidence), "seeds": 1}


def test_a_system_as_good_as_the_single_model_at_twice_the_compute_is_found_worth_about_2x():
    rng = np.random.default_rng(0)
    better = PowerLaw(SINGLE_LAW.a * 2 ** -SINGLE_LAW.alpha, SINGLE_LAW.alpha, SINGLE_LAW.e_inf, SINGLE_LAW.c0)
    labels = {"single model": "baseline", "MoDE-4": "routed ensemble"}
    hits = {("single model", "t"): hits_following(SINGLE_LAW, BUDGETS, 20_000, rng),
            ("MoDE-4", "t"): hits_following(better, BUDGETS, 20_000, rng)}
    err, draws = error_draws({"t": "classification"}, hits, labels, resamples=100, seed=0)
    single = fit_system(BUDGETS, err[("single model", "t")], draws[("single model", "t")], 0.95)
    other = fit_system(BUDGETS, err[("MoDE-4", "t")], draws[("MoDE-4", "t")], 0.95)
    assert single["law"]["alpha"] == pytest.approx(0.4, abs=0.1)
    assert single["holdout"]["error"] == pytest.approx(0.0, abs=0.02)
    diff = err[("MoDE-4", "t")] - err[("single model", "t")]
    measured = measured_difference(diff, draws[("MoDE-4", "t")] - draws[("single model", "t")], BUDGETS, 0.95)
    result = compare(single, other, BUDGETS, measured, 0.95)
    top = result["multipliers"][-1]
    assert top["value"] == pytest.approx(2.0, rel=0.35)
    assert top["interval"][0] > 1  # the interval excludes "no better"
    assert verdict(result["difference_at_largest"], seeds=2) == "beat the single model"
    assert verdict(result["difference_at_largest"], seeds=1) == "ahead of the single model"  # a lead only
    assert result["crossing"] is None  # one law is below the other everywhere
    # the mean task is the mean of the classification tasks' errors
    np.testing.assert_allclose(err[("MoDE-4", "mean")], err[("MoDE-4", "t")])


def test_two_systems_equal_in_truth_are_almost_never_called_different():
    labels = {"single model": "baseline", "MoDE-2": "MoDE-2 routed ensemble"}
    verdicts = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        hits = {(label, "t"): hits_following(SINGLE_LAW, BUDGETS, 3_000, rng) for label in labels}
        err, draws = error_draws({"t": "classification"}, hits, labels, resamples=200, seed=0)
        fits = {label: fit_system(BUDGETS, err[(label, "t")], draws[(label, "t")], 0.95) for label in labels}
        diff = err[("MoDE-2", "t")] - err[("single model", "t")]
        measured = measured_difference(diff, draws[("MoDE-2", "t")] - draws[("single model", "t")], BUDGETS, 0.95)
        result = compare(fits["single model"], fits["MoDE-2"], BUDGETS, measured, 0.95)
        verdicts.append(verdict(result["difference_at_largest"], seeds=1))
    # 95% intervals: at most one of ten equal pairs called different (P(2 or more) is about 9%)
    assert verdicts.count("no significant difference from the single model") >= 9


# ---------------------------------------------------------------- end to end, on CPU

SWEEP = {"models": ["experts/model_configs/moda-micro.json"], "epochs": [2, 4], "experts": [2, 3], "resamples": 50}


def checkpoints(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.pt"))}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, tiny_data):
    """A two-point sweep SIGKILLed (with its trainer and server) once the second point started
    training, then run again to the end."""
    root = tmp_path_factory.mktemp("sweep")
    # no patch dropout: one trainer launch a model (a masked phase and an unmasked tune would be two)
    config = write_config(root / "sweep.yaml", tiny_data, sweep=SWEEP, report={"seeds": 1, "resamples": 200},
                          train={"patch_dropout": 0.0, "unmasked_tune_share": 0.0})
    run = RunLayout(root / "run")
    first, second = (run.sweep_point(p.name) for p in plan(load_config(config)).points)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.run.cli", "sweep", str(config), "--run-dir",
                             str(run.root)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    while proc.poll() is None:
        if second.train_logs.exists():
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.2)
    proc.wait()
    assert killed, "the sweep ended before its second point started training"
    assert (first.report / "manifest.json").is_file() and not (second.report / "manifest.json").exists()
    before = checkpoints(first.root)
    from pipelines.run.flows import sweep

    with prefect_harness():
        started = time.perf_counter()
        markdown = sweep(config_path=str(config), run_dir=str(run.root))
        seconds = time.perf_counter() - started
        again_started = time.perf_counter()
        sweep(config_path=str(config), run_dir=str(run.root))
        again = time.perf_counter() - again_started
    return {"run": run, "first": first, "second": second, "before": before, "markdown": markdown,
            "seconds": seconds, "again": again}


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_retraining_its_finished_points(killed_and_resumed):
    r = killed_and_resumed
    assert checkpoints(r["first"].root) == r["before"]
    assert (r["second"].report / "manifest.json").is_file()
    assert r["again"] < r["seconds"] / 2  # a finished sweep, run again, starts nothing


@pytest.mark.slow
def test_a_two_point_sweep_shares_its_clusters_and_summarises_cost_and_error(killed_and_resumed):
    r = killed_and_resumed
    run, first = r["run"], r["first"]
    for stage in ("embed", "cluster", "split"):
        assert first.stage(stage).is_symlink() and first.stage(stage).resolve() == run.stage(stage).resolve()
    assert first.ablation("experts=3").cluster.resolve() == run.ablation("experts=3").cluster.resolve()
    summary = json.loads(run.scaling_json.read_text())
    assert [p["name"] for p in summary["points"]] == ["moda-micro-e2", "moda-micro-e4"]
    e2, e4 = summary["points"]
    assert e4["samples"]["single model"] == 2 * e2["samples"]["single model"]
    assert e4["samples"]["MoDE-3"] > e2["samples"]["MoDE-3"]  # whole batches per expert: not exactly 2x
    per_sample = [p["flops"]["MoDE-3"] / p["samples"]["MoDE-3"] for p in (e2, e4)]
    assert per_sample[1] == pytest.approx(per_sample[0])  # one model, no patch dropout: one cost a sample
    assert e2["params"] == 3_289_217 and e2["gflops_per_sample"]["unmasked"] > 0
    assert e2["total_flops"] > e2["flops"]["single model"] and e2["gpu_hours"] is None
    assert set(e2["error"]) == {"single model", "MoDE-2", "MoDE-3"}
    # two budgets cannot fit a three-parameter law: said, not faked
    assert all(fit["law"] is None and "needs 3 or more" in fit["why"] for fit in summary["fits"]["MoDE-2"].values())
    assert "no law" in r["markdown"] and (run.scaling / "mean.png").is_file()
    assert scaling_markdown(summary) == run.scaling_markdown.read_text()


@pytest.mark.slow
def test_points_evaluated_at_once_give_the_results_of_one_after_another(killed_and_resumed):
    """Both points made pending again (their evaluate and report undone) and run two at a time as Prefect
    tasks: the same files, no checkpoint touched."""
    r = killed_and_resumed
    run, layouts = r["run"], (r["first"], r["second"])
    results = [file_sha256(p.results) for p in layouts]
    before = [checkpoints(p.root) for p in layouts]
    for p in layouts:
        for stage in (p.evaluate, p.report):
            (stage / "manifest.json").unlink()
    from pipelines.run.flows import sweep

    with prefect_harness():
        sweep(config_path=str(run.root.parent / "sweep.yaml"), run_dir=str(run.root),
              overrides={"sweep": {"parallel_points": 2}})
    assert [file_sha256(p.results) for p in layouts] == results
    assert [checkpoints(p.root) for p in layouts] == before
    assert all((p.report / "manifest.json").is_file() for p in layouts)


@pytest.mark.parametrize("preset", ["configs/sweep-cpu.yaml", "configs/sweep-gpu.yaml"])
def test_the_presets_sweep_three_models_growing_in_width_and_depth_over_four_log_spaced_budgets(preset):
    cfg = load_config(ROOT / preset)
    shapes = []
    for model in cfg.sweep.models:
        spec = json.loads((ROOT / model).read_text())
        shapes.append((spec["vision_cfg"]["width"], spec["vision_cfg"]["layers"] + spec["text_cfg"]["layers"]))
    assert len(shapes) >= 3 and all(a[0] < b[0] and a[1] < b[1] for a, b in zip(shapes, shapes[1:]))
    ratios = np.diff(np.log(sorted(cfg.sweep.epochs)))
    assert len(cfg.sweep.epochs) >= 4 and np.allclose(ratios, ratios[0])
