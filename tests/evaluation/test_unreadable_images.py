"""An evaluation image that does not decode (#16): with `evaluate.unreadable_images: skip` it is
left out of every model's scores, counted and named (task, shard, key, error) in results.json and
results.md; with `error` evaluation stops naming the shard and the key. Every model is scored on
the same images, so the comparison between rows stays paired."""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.image_stream import ImageError, TaskImages, stream_image_features
from evaluation.tasks import Task, without_unreadable
from pipelines.core.config import load_config
from pipelines.run.stages import run_stage
from pipelines.shardio.shards import iter_samples

from conftest import tar_bytes


def jpeg(colour: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (colour, 10, 200 - colour)).save(buf, "JPEG")
    return buf.getvalue()


def noisy_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


TRUNCATED = noisy_jpeg()[:1500]  # cut in its scan: PIL reads the header and size, the pixels fail
GARBAGE = b"\xff\xd8 not an image"


class FakeClip:
    """A stand-in image tower: the mean colour of each image, so a row is easy to recognise."""

    device = "cpu"

    @staticmethod
    def preprocess(image):
        return torch.tensor(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)))

    class model:  # open_clip's attribute name
        @staticmethod
        def encode_image(pixels):
            return pixels + 1.0


def shard_of(tmp_path: Path, members) -> TaskImages:
    shard = tmp_path / "00000.tar"
    shard.write_bytes(tar_bytes(members))
    return TaskImages((shard,), (len({m.split(".")[0] for m, _ in members}),))


def test_an_image_that_does_not_decode_is_an_error_naming_the_shard_and_key(tmp_path):
    images = shard_of(tmp_path, [("a.jpg", jpeg(10)), ("b.jpg", TRUNCATED), ("c.jpg", jpeg(90))])
    with pytest.raises(ImageError, match=r"00000.tar: sample 'b': the image does not decode"):
        stream_image_features(FakeClip, images, batch_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_images_are_nan_rows_listed_with_shard_key_and_error(tmp_path, workers):
    images = shard_of(tmp_path, [("a.jpg", jpeg(10)), ("b.jpg", TRUNCATED), ("c.jpg", GARBAGE), ("d.jpg", jpeg(90))])
    bad: list[dict] = []
    feats = stream_image_features(FakeClip, images, batch_size=3, workers=workers, unreadable=bad)
    assert [(b["index"], b["key"]) for b in bad] == [(1, "b"), (2, "c")]
    assert all(b["shard"].endswith("00000.tar") and "does not decode" in b["error"] for b in bad)
    assert np.isnan(feats[[1, 2]]).all() and not np.isnan(feats[[0, 3]]).any()
    (tmp_path / "clean").mkdir()
    clean = stream_image_features(FakeClip, shard_of(tmp_path / "clean", [("a.jpg", jpeg(10)), ("d.jpg", jpeg(90))]))
    np.testing.assert_allclose(feats[[0, 3]], clean)  # the readable rows are what they would be alone


def test_leaving_out_a_retrieval_image_drops_its_captions_and_renumbers_the_rest():
    task = Task("r", "retrieval", TaskImages((), (4,)), captions=["a0", "a1", "b0", "c0", "d0", "d1"],
                caption_image=np.array([0, 0, 1, 2, 3, 3]))
    out = without_unreadable(task, [{"index": 1, "shard": "s.tar", "key": "b", "error": "x"}])
    assert out.captions == ["a0", "a1", "c0", "d0", "d1"]
    assert out.caption_image.tolist() == [0, 0, 1, 2, 2]  # image 2 is now the second readable one
    assert out.readable.tolist() == [True, False, True, True]
    assert out.unreadable == [{"index": 1, "shard": "s.tar", "key": "b", "error": "x", "split": "test"}]
    assert task.captions[2] == "b0"  # the original task is left as it was


def test_leaving_out_a_classification_image_drops_its_label_and_its_train_twin_separately():
    task = Task("c", "classification", TaskImages((), (3,)), labels=np.array([0, 1, 2]), classnames=list("abc"),
                train_images=TaskImages((), (2,)), train_labels=np.array([2, 1]))
    out = without_unreadable(task, [{"index": 0, "shard": "s", "key": "k", "error": "x"}],
                             [{"index": 1, "shard": "t", "key": "j", "error": "y"}])
    assert out.labels.tolist() == [1, 2] and out.train_labels.tolist() == [2]
    assert [e["split"] for e in out.unreadable] == ["test", "train"]


# --- through the evaluate stage -----------------------------------------------------------------

def damaged_eval(tiny_data: Path, root: Path) -> Path:
    """tiny_data's evaluation tasks with a second digits shard holding a truncated JPEG and bytes
    that are no image at all, both labelled."""
    shutil.copytree(tiny_data / "eval", root)
    digits = root / "digits"
    (digits / "00001.tar").write_bytes(tar_bytes([("cut.jpg", TRUNCATED), ("cut.cls", b"3"),
                                                  ("junk.jpg", GARBAGE), ("junk.cls", b"4")]))
    sizes = json.loads((digits / "sizes.json").read_text())
    (digits / "sizes.json").write_text(json.dumps({**sizes, "00001.tar": 2}))
    return root


def run_over(tiny_run, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "train"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    return run


@pytest.mark.slow
def test_evaluate_leaves_unreadable_images_out_of_every_model_counts_and_names_them(tiny_run, tiny_data, tmp_path):
    root = damaged_eval(tiny_data, tmp_path / "eval")
    run = run_over(tiny_run, tmp_path)
    cfg = load_config(tiny_run["config"], overrides={"data": {"eval_tasks": str(root)}})
    manifest = run_stage("evaluate", cfg, run)
    results = json.loads((run / "evaluate" / "results.json").read_text())
    reference = json.loads((tiny_run["run_dir"] / "evaluate" / "results.json").read_text())
    digits = results["tasks"]["digits"]
    assert digits["unreadable_images"] == 2
    assert digits["num_images"] == reference["tasks"]["digits"]["num_images"]
    assert [(Path(e["shard"]).name, e["key"], e["split"]) for e in results["unreadable_images"]["digits"]] == \
        [("00001.tar", "cut", "test"), ("00001.tar", "junk", "test")]
    assert all(results["tasks"][t]["unreadable_images"] == 0 for t in results["tasks"] if t != "digits")
    # every row scored on the images the clean task holds: the same numbers as the clean run
    for row in reference["rows"]:
        assert digits[row] == reference["tasks"]["digits"][row], row
    assert manifest["counts"]["images_unreadable"] == 2
    assert manifest["counts"]["images_scored"] == manifest["counts"]["images"] - 2
    md = (run / "evaluate" / "results.md").read_text()
    assert "Task `digits`: 2 image(s) that do not decode" in md and "`00001.tar:cut`" in md


@pytest.mark.slow
def test_with_unreadable_images_error_evaluate_stops_naming_the_shard_and_key(tiny_run, tiny_data, tmp_path):
    from evaluation.tasks import TaskError

    root = damaged_eval(tiny_data, tmp_path / "eval")
    run = run_over(tiny_run, tmp_path)
    cfg = load_config(tiny_run["config"], overrides={"data": {"eval_tasks": str(root)},
                                                     "evaluate": {"unreadable_images": "error"}})
    with pytest.raises(TaskError, match=r"00001.tar: sample 'junk': the image does not decode"):
        run_stage("evaluate", cfg, run)  # the garbage bytes fail at load, before any model runs
    (root / "digits" / "00001.tar").write_bytes(tar_bytes([("cut.jpg", TRUNCATED), ("cut.cls", b"3")]))
    sizes = json.loads((root / "digits" / "sizes.json").read_text())
    (root / "digits" / "sizes.json").write_text(json.dumps({**sizes, "00001.tar": 1}))
    assert len(list(iter_samples(root / "digits" / "00001.tar"))) == 1
    with pytest.raises(ImageError, match=r"00001.tar: sample 'cut': the image does not decode"):
        run_stage("evaluate", cfg, run)  # its header reads: the pixels fail in the first model's pass
