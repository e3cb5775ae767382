"""`moda add-expert` in its three modes on a copy of the tiny run: existing experts untouched."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from experts.registry import load_experts, read_added
from pipelines.core.config import load_config
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import file_sha256
from pipelines.run.add_expert import AddRequest, run_add_expert
from pipelines.run.cli import main as cli_main
from pipelines.run.stages import NAMES as STAGES
from pipelines.run.stages import run_stage
from pipelines.synth.generate import generate

from conftest import write_config

pytestmark = pytest.mark.slow


def tree_hashes(folder):
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def existing_files(run):
    """Every file of the original system: experts' checkpoints and models, and their shards."""
    return tree_hashes(run / "split") | {f"train/{k}": v for k, v in tree_hashes(run / "train").items()}


@pytest.fixture(scope="module")
def run(tiny_run, tiny_data, tmp_path_factory):
    """A copy of the tiny run (so other tests keep theirs), its config, and new data for `new-data`."""
    root = tmp_path_factory.mktemp("add_expert")
    shutil.copytree(tiny_run["run_dir"], root / "run", symlinks=True)
    cfg = load_config(tiny_run["config"])
    new_data = root / "new"
    generate(dataclasses.replace(cfg.synth, num_train=90, shard_size=45, seed=7, out_dir=str(new_data)))
    return {"cfg": cfg, "config": tiny_run["config"], "run": root / "run", "new": new_data / "train",
            "before": existing_files(root / "run")}


@pytest.fixture(scope="module")
def added(run):
    """Add one expert in each mode, in order; keep each manifest."""
    cfg, root = run["cfg"], run["run"]
    requests = [AddRequest(mode="split-widest"),
                AddRequest(mode="task", task=str(run["new"].parent / "eval" / "shapes")),
                AddRequest(mode="new-data", new_data=str(run["new"]))]
    return [run_add_expert(cfg, root, request) for request in requests]


def test_each_mode_registers_one_more_expert_with_the_next_id(run, added):
    experts = load_experts(RunLayout(run["run"]))
    assert [e.name for e in experts] == ["expert_000", "expert_001", "expert_002", "expert_003", "expert_004"]
    assert [e.added for e in experts] == [False, False, True, True, True]
    assert [m["expert"]["mode"] for m in added] == ["split-widest", "task", "new-data"]
    for expert in experts[2:]:
        assert (expert.path / "open_clip_model.safetensors").is_file() and expert.fine_clusters


def test_adding_experts_leaves_every_existing_checkpoint_and_shard_unchanged(run, added):
    assert existing_files(run["run"]) == run["before"]


def test_split_widest_trains_on_part_of_the_widest_experts_fine_clusters(run, added):
    root, entry = run["run"], added[0]["expert"]
    report = json.loads((root / "cluster" / "report.json").read_text())
    widest = int(np.argmax(report["expert_spread"]))
    owner = np.load(root / "cluster" / "expert_of_fine.npy")
    assert entry["selection"]["split_from"] == f"expert_{widest:03d}"
    assert set(entry["fine_clusters"]) < set(np.flatnonzero(owner == widest).tolist())
    split = json.loads((root / "added" / entry["name"] / "split" / "manifest.json").read_text())["counts"]
    assert split["selected"] == split["written"] + split["rejected_by_split"]
    assert entry["samples"] == split["written"] > 0


def test_a_task_expert_owns_the_nearest_fine_clusters_of_its_class_names(run, added):
    entry = added[1]["expert"]
    spec = json.loads((run["new"].parent / "eval" / "shapes" / "task.json").read_text())
    assert entry["selection"]["classnames"] == spec["classnames"]
    assert 1 <= len(entry["fine_clusters"]) <= 2 * len(spec["classnames"])  # fine_per_class = 2


def test_a_new_data_expert_trains_on_every_usable_new_sample(run, added):
    entry = added[2]["expert"]
    assert entry["selection"]["samples_in"] == 90
    assert entry["samples"] + sum(entry["selection"]["rejected"].values()) == 90
    assert entry["selection"]["covered"] >= 0.9


def test_adding_the_same_expert_again_is_skipped(run, added):
    request = AddRequest(mode="task", task=str(run["new"].parent / "eval" / "shapes"))
    again = run_add_expert(run["cfg"], run["run"], request)
    assert again.get("skipped") and again["expert"]["name"] == "expert_003"
    assert len(read_added(RunLayout(run["run"]))) == 3


def test_split_widest_again_splits_the_next_widest_expert_then_refuses(run, added, tmp_path):
    copy = tmp_path / "run"  # its own copy: the other tests here count three added experts
    shutil.copytree(run["run"], copy, symlinks=True)
    first = added[0]["expert"]["selection"]["split_from"]
    second = run_add_expert(run["cfg"], copy, AddRequest(mode="split-widest"))["expert"]
    assert second["name"] == "expert_005" and second["selection"]["split_from"] not in (first, None)
    with pytest.raises(ValueError, match="every expert has been split once"):
        run_add_expert(run["cfg"], copy, AddRequest(mode="split-widest"))  # the tiny run has two


def test_routing_and_evaluation_use_the_added_experts(run, added):
    root = run["run"]
    manifest = run_stage("evaluate", run["cfg"], root)
    assert not manifest.get("skipped") and manifest["counts"]["added_experts"] == 3
    results = json.loads((root / "evaluate" / "results.json").read_text())
    assert {"expert_002", "expert_003", "expert_004"} <= set(results["rows"])
    for task in results["tasks"].values():
        assert len(task["routing_weights"]) == 5
    # The task-targeted expert owns the shapes class names' nearest fine clusters,
    # so it takes part in routing the shapes task.
    routing = json.loads((root / "evaluate" / "routing.json").read_text())
    assert any(3 in entry["owners"] for entry in routing["shapes"]["metadata"])


def test_the_other_stages_still_skip_after_an_expert_is_added(run, added):
    for stage in STAGES[:-1]:
        assert run_stage(stage, run["cfg"], run["run"]).get("skipped"), stage


def test_cli_add_expert_rejects_a_request_without_its_input(run, capsys):
    assert cli_main(["add-expert", str(run["config"]), "--mode", "new-data", "--run-dir", str(run["run"])]) == 2
    assert "needs the new shards" in capsys.readouterr().err


def test_a_config_with_a_bad_coverage_fails_at_load(tmp_path, tiny_data):
    from pipelines.core.config import ConfigError

    with pytest.raises(ConfigError, match="add_expert.coverage"):
        load_config(write_config(tmp_path / "c.yaml", tiny_data, add_expert={"coverage": 0}))


def test_moda_predict_loads_the_added_experts_and_routes_over_them(run, added):
    from serving.predict import MoDESystem

    system = MoDESystem.load(run["run"])
    assert system.expert_names[-3:] == ["expert_002", "expert_003", "expert_004"]
    weights = system.route_texts(np.eye(1, system.fine_centroids.shape[1], dtype=np.float32))
    assert weights.shape == (5,) and weights.sum() == pytest.approx(1.0)


def test_a_task_request_reads_a_clip_benchmark_set_as_evaluation_does(tmp_path):
    import tarfile

    from pipelines.run.add_expert import AddRequest

    folder = tmp_path / "cb_pets"
    (folder / "test").mkdir(parents=True)
    tarfile.open(folder / "test" / "0.tar", "w").close()  # the set's images are not read for its metadata
    (folder / "classnames.txt").write_text("cat\ndog\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} pet.\n")
    names, templates = AddRequest(mode="task", task=str(folder)).task_metadata()
    assert names == ["cat", "dog"] and templates == ["a photo of a {c}.", "a {c} pet."]
    own = tmp_path / "own"
    own.mkdir()
    (own / "task.json").write_text('{"kind": "classification", "classnames": ["a", "b"]}')
    assert AddRequest(mode="task", task=str(own)).task_metadata() == (["a", "b"], ["a photo of a {}."])
    (own / "task.json").write_text('{"kind": "retrieval"}')
    with pytest.raises(ValueError, match="needs class names"):
        AddRequest(mode="task", task=str(own)).task_metadata()
