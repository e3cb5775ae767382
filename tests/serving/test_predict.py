"""The user-facing API and CLI: a trained MoDE system from its run folder."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipelines.run.cli import main as cli_main
from pipelines.shardio.shards import iter_samples
from serving.predict import MoDESystem

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def system(tiny_run):
    return MoDESystem.load(tiny_run["run_dir"])


def eval_images(tiny_data, task, n=3):
    samples = list(iter_samples(tiny_data / "eval" / task / "00000.tar"))[:n]
    return [Image.open(io.BytesIO(s.files["jpg"])).convert("RGB") for s in samples]


def test_system_loads_every_expert_in_the_registry(system, tiny_run):
    registry = json.loads((tiny_run["run_dir"] / "train" / "registry.json").read_text())
    assert system.expert_names == [e["model_dir"] for e in registry["experts"]]


def test_classify_returns_probabilities_and_routing_weights(system, tiny_data):
    probs, weights = system.classify(eval_images(tiny_data, "shapes"), ["circle", "square", "star"])
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert weights.shape == (2,) and weights.sum() == pytest.approx(1.0)


def test_classify_matches_the_evaluation_stage_routing(system, tiny_run, tiny_data):
    spec = json.loads((tiny_data / "eval" / "scenes" / "task.json").read_text())
    _, weights = system.classify(eval_images(tiny_data, "scenes", 1), spec["classnames"], spec["templates"])
    results = json.loads((tiny_run["run_dir"] / "evaluate" / "results.json").read_text())
    np.testing.assert_allclose(weights, results["tasks"]["scenes"]["routing_weights"], rtol=1e-5)


def test_rank_captions_scores_every_caption(system, tiny_data):
    scores, weights = system.rank_captions(eval_images(tiny_data, "scenes", 1)[0],
                                           ["a beach at sunset", "digit seven", "red stripes"])
    assert scores.shape == (3,) and np.isfinite(scores).all()


def test_cli_predict_prints_the_classify_apis_classes_and_weights(system, tiny_run, tiny_data, tmp_path, capsys):
    path = tmp_path / "img.png"  # lossless: the CLI reads back the very pixels classify() is given
    image = eval_images(tiny_data, "shapes", 1)[0]
    image.save(path)
    classes = ["circle", "square", "star"]
    code = cli_main(["predict", str(tiny_run["run_dir"]), str(path), "--classes", ",".join(classes)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    probs, weights = system.classify([image], classes)
    assert out["routing_weights"] == pytest.approx(dict(zip(["expert_000", "expert_001"], weights.tolist())))
    top = out["predictions"][0]["top"]
    assert [p["class"] for p in top] == [classes[j] for j in probs[0].argsort()[::-1]]  # every class, best first
    assert [p["prob"] for p in top] == pytest.approx(sorted(probs[0].tolist(), reverse=True), abs=1e-4)


def test_missing_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train the experts first"):
        MoDESystem.load(tmp_path)
