"""The experts a run serves: the train stage's, then the added ones that belong to its current seed."""

import json

import numpy as np
import pytest

from experts.registry import load_experts, ownership, register_added
from pipelines.core.layout import RunLayout
from pipelines.core.manifest import atomic_write_json
from pipelines.run.add_expert import AddRequest, _next_id, _pending_id


@pytest.fixture
def run(tmp_path):
    """A run folder with a train manifest (fingerprint "current") and two trained experts."""
    atomic_write_json(tmp_path / "train" / "manifest.json", {"fingerprint": "current"})
    atomic_write_json(tmp_path / "train" / "registry.json", {"experts": [
        {"id": 0, "model_dir": "expert_000", "fine_clusters": [0, 1]},
        {"id": 1, "model_dir": "expert_001", "fine_clusters": [2, 3]}]})
    return RunLayout(tmp_path)


def added(expert_id, train_fingerprint, fine):
    return {"id": expert_id, "name": f"expert_{expert_id:03d}", "fine_clusters": fine,
            "model_dir": f"added/expert_{expert_id:03d}/train/expert_{expert_id:03d}",
            "train_fingerprint": train_fingerprint, "request_fingerprint": f"r{expert_id}"}


def test_added_experts_follow_the_trained_ones_and_may_share_fine_clusters(run):
    register_added(run, added(2, "current", [1, 2]))
    experts = load_experts(run)
    assert [e.name for e in experts] == ["expert_000", "expert_001", "expert_002"]
    assert experts[2].path == run.root / "added" / "expert_002" / "train" / "expert_002"
    np.testing.assert_array_equal(ownership(experts, 4), [[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]])


def test_an_expert_added_to_an_older_seed_is_left_out(run):
    register_added(run, added(2, "an-older-train-run", [0]))
    register_added(run, added(3, "current", [3]))
    assert [e.name for e in load_experts(run)] == ["expert_000", "expert_001", "expert_003"]


def test_new_ids_skip_every_id_in_use_and_a_killed_request_keeps_its_id(run):
    register_added(run, added(2, "an-older-train-run", [0]))
    atomic_write_json(run.root / "added" / "expert_003" / "request.json", {"fingerprint": "killed-one"})
    assert _next_id(run) == 4
    assert _pending_id(run, "killed-one") == 3
    assert _pending_id(run, "another") is None


def test_a_request_with_unknown_fields_or_missing_inputs_is_refused():
    with pytest.raises(ValueError, match="unknown field"):
        AddRequest.from_dict({"mode": "task", "clases": ["a"]})
    with pytest.raises(ValueError, match="unknown mode"):
        AddRequest(mode="grow").check()
    with pytest.raises(ValueError, match="needs a task folder"):
        AddRequest(mode="task").check()
    assert AddRequest.from_dict({"mode": "task", "classnames": ["a"]}).task_metadata() == (["a"], ["a photo of a {}."])


def test_the_added_registry_is_json_with_entries_in_id_order(run):
    register_added(run, added(3, "current", [0]))
    register_added(run, added(2, "current", [1]))
    register_added(run, added(3, "current", [2]))  # the same id again replaces its entry
    entries = json.loads((run.root / "added" / "registry.json").read_text())["experts"]
    assert [(e["id"], e["fine_clusters"]) for e in entries] == [(2, [1]), (3, [2])]
