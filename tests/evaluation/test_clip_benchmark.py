"""Evaluation the field can compare with: clip_benchmark's WebDataset layout read as it is, and
moda's numbers on it agreeing with the real clip_benchmark package's on the same model and data."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from evaluation.tasks import TaskError, load_tasks
from pipelines.core.config import load_config
from pipelines.run.stages import run_stage

CAPTIONS_PER_IMAGE = 5


def webp(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="webp", lossless=True)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_cb(folder: Path, samples: list[list[tuple[str, bytes]]], shards: int = 2, **texts: list[str]) -> None:
    """A clip_benchmark dataset: test/0.tar.. (samples dealt in order), nshards.txt, the text files."""
    (folder / "test").mkdir(parents=True)
    per = -(-len(samples) // shards)
    for s in range(shards):
        write_tar(folder / "test" / f"{s}.tar", [m for sample in samples[s * per:(s + 1) * per] for m in sample])
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    for name, lines in texts.items():
        (folder / name).write_text("\n".join(lines) + "\n")


def cb_from_moda(moda_eval: Path, root: Path) -> dict:
    """moda's synthetic digits and retrieval tasks rewritten in clip_benchmark's layout: webp images,
    `{c}` templates, 5 captions per retrieval image (the real one and 4 rewordings)."""
    tasks = {t.name: t for t in load_tasks(moda_eval)}
    digits, retrieval = tasks["digits"], tasks["retrieval"]
    write_cb(root / "cb_digits",
             [[(f"s{i:07d}.webp", webp(im)), (f"s{i:07d}.cls", str(int(y)).encode())]
              for i, (im, y) in enumerate(zip(digits.images.decoded(), digits.labels))],
             **{"classnames.txt": digits.classnames,
                "zeroshot_classification_templates.txt": [t.replace("{}", "{c}") for t in digits.templates]})
    rewordings = ("{}", "a picture: {}", "{}, in a photo", "here is {}", "an image of {}")
    write_cb(root / "cb_retrieval",
             [[(f"s{i:07d}.webp", webp(im)), (f"s{i:07d}.txt", "\n".join(r.format(c) for r in rewordings).encode())]
              for i, (im, c) in enumerate(zip(retrieval.images.decoded(), retrieval.captions))],
             **{"dataset_type.txt": ["retrieval"]})
    return {"digits": digits.images.total, "retrieval": retrieval.images.total}


@pytest.fixture(scope="module")
def cb_eval(tiny_run, tiny_data, tmp_path_factory):
    """The tiny run evaluated by moda on clip_benchmark-format copies of two of its tasks."""
    root = tmp_path_factory.mktemp("cb_eval")
    sizes = cb_from_moda(tiny_data / "eval", root / "tasks")
    run = root / "run"
    run.mkdir()
    for stage in ("embed", "cluster", "train"):
        os.symlink(tiny_run["run_dir"] / stage, run / stage)
    cfg = load_config(tiny_run["config"], overrides={"data": {"eval_tasks": str(root / "tasks"), "val_tasks": ""}})
    run_stage("evaluate", cfg, run)
    return {"root": root, "run": run, "sizes": sizes}


@pytest.mark.slow
def test_clip_benchmark_sets_are_read_as_they_are_with_several_captions_per_image(cb_eval):
    tasks = {t.name: t for t in load_tasks(cb_eval["root"] / "tasks")}
    assert tasks["cb_digits"].images.total == cb_eval["sizes"]["digits"]
    assert len(tasks["cb_digits"].images.shards) == 2  # test/0.tar, test/1.tar, in number order
    assert tasks["cb_digits"].templates[0].count("{c}") == 1
    retrieval = tasks["cb_retrieval"]
    assert len(retrieval.captions) == CAPTIONS_PER_IMAGE * retrieval.images.total
    np.testing.assert_array_equal(retrieval.caption_image, np.repeat(np.arange(retrieval.images.total), 5))


@pytest.mark.slow
def test_results_are_written_in_clip_benchmarks_format_and_as_datacomp_style_jsonl(cb_eval):
    evaluate = cb_eval["run"] / "evaluate"
    result = json.loads((evaluate / "clip_benchmark" / "cb_digits__expert_000.json").read_text())
    assert result["task"] == "zeroshot_classification" and result["dataset"] == "cb_digits"
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    lines = [json.loads(line) for line in (evaluate / "results.jsonl").read_text().splitlines()]
    rows = json.loads((evaluate / "results.json").read_text())["rows"]
    assert len(lines) == 2 * len(rows)
    retrieval = next(x for x in lines if x["key"] == "cb_retrieval" and x["model"] == "routed ensemble")
    assert {"image_retrieval_recall@10", "text_retrieval_recall@10", "main_metric"} <= set(retrieval["metrics"])


# clip_benchmark 1.6.2's accuracy() calls float() on a (1,) array, which numpy 2 refuses; the shim
# gives that one module a float() that takes it, and runs clip_benchmark's own CLI unchanged otherwise.
CLIP_BENCHMARK = (
    "import builtins, sys, numpy as np\n"
    "import clip_benchmark.metrics.zeroshot_classification as z\n"
    "z.float = lambda x: builtins.float(np.asarray(x).reshape(()))\n"
    "from clip_benchmark.cli import main\n"
    "sys.argv = ['clip_benchmark'] + sys.argv[1:]\n"
    "main()\n"
)


def clip_benchmark_eval(model_dir: Path, dataset: Path, task: str, out: Path) -> dict:
    """The real clip_benchmark's `eval` on a local-dir model (fp32, as moda evaluates on a CPU). Its
    retrieval cannot take k above the number of images (8 here), so it is asked for 1 and 5."""
    subprocess.run([sys.executable, "-c", CLIP_BENCHMARK, "eval", "--dataset", f"wds/{dataset.name}",
                    "--dataset_root", str(dataset), "--model", f"local-dir:{model_dir}", "--pretrained", "",
                    "--task", task, "--no_amp", "--num_workers", "0", "--batch_size", "16",
                    "--recall_k", "1", "5", "--output", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())["metrics"]


@pytest.mark.slow
def test_moda_and_the_real_clip_benchmark_agree_within_a_tenth_of_a_point(cb_eval, tiny_run, tmp_path):
    model_dir = tiny_run["run_dir"] / "train" / "expert_000"
    for dataset, task in (("cb_digits", "zeroshot_classification"), ("cb_retrieval", "zeroshot_retrieval")):
        theirs = clip_benchmark_eval(model_dir, cb_eval["root"] / "tasks" / dataset, task, tmp_path / f"{dataset}.json")
        ours = json.loads((cb_eval["run"] / "evaluate" / "clip_benchmark" / f"{dataset}__expert_000.json")
                          .read_text())["metrics"]
        common = set(ours) & set(theirs)
        assert {"acc1", "acc5", "mean_per_class_recall"} <= common if task.endswith("classification") else \
            {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5)} <= common
        for metric in common:
            assert ours[metric] == pytest.approx(theirs[metric], abs=1e-3), (dataset, metric)
    assert ours["image_retrieval_recall@10"] is None  # 8 images: k = 10 is left out, as clip_benchmark must


TEMPLATES = "zeroshot_classification_templates.txt"


@pytest.mark.parametrize("texts, nshards, error", [
    ({TEMPLATES: ["a photo of a {c}."]}, 1, r"cars: classnames.txt not found"),
    ({"classnames.txt": ["sedan"], TEMPLATES: ["a photo of a car."]}, 1, "must hold the class name once"),
    ({"classnames.txt": ["sedan"], TEMPLATES: ["a {c}."]}, 2, r"counts 2 shards but \['1.tar'\] are not there"),
    ({"dataset_type.txt": ["multilabel"]}, 1, "multi-label sets are not evaluated"),
], ids=["no class names", "template without placeholder", "shard missing", "multi-label"])
def test_a_clip_benchmark_set_that_cannot_be_evaluated_is_an_error_naming_the_file(tmp_path, texts, nshards, error):
    write_cb(tmp_path / "cars", [[("s0.webp", b"x"), ("s0.cls", b"0")]], shards=1, **texts)
    (tmp_path / "cars" / "test" / "nshards.txt").write_text(f"{nshards}\n")
    with pytest.raises(TaskError, match=error):
        load_tasks(tmp_path)


def test_builtin_imagenet_metadata_comes_from_open_clip(tmp_path):
    from evaluation.tasks import read_spec

    (tmp_path / "task.json").write_text(json.dumps({"kind": "classification", "classnames": "imagenet1k"}))
    spec = read_spec(tmp_path)
    assert len(spec["classnames"]) == 1000 and len(spec["templates"]) == 80
    (tmp_path / "task.json").write_text(json.dumps({"kind": "classification", "classnames": "imagenet1k",
                                                    "templates": "simple"}))
    assert len(read_spec(tmp_path)["templates"]) == 7


def test_several_task_roots_joined_by_double_colons_are_read_together_and_names_stay_unique(cb_sets_small):
    moda_root, cb_root = cb_sets_small
    tasks = load_tasks(f"{moda_root}::{cb_root}")
    assert sorted(t.name for t in tasks) == ["cars", "pets"]
    with pytest.raises(TaskError, match="two evaluation tasks are named 'pets'"):
        load_tasks(f"{moda_root}::{moda_root}")


@pytest.fixture
def cb_sets_small(tmp_path):
    """A moda task folder (pets) under one root, a clip_benchmark set (cars) under another."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="png")
    moda_root = tmp_path / "moda" / "pets"
    moda_root.mkdir(parents=True)
    (moda_root / "task.json").write_text(json.dumps({"name": "pets", "kind": "classification",
                                                     "classnames": ["cat"], "templates": ["a {}."]}))
    write_tar(moda_root / "00000.tar", [("a.png", buf.getvalue()), ("a.cls", b"0")])
    write_cb(tmp_path / "cb" / "cars", [[("s0.png", buf.getvalue()), ("s0.cls", b"0")]], shards=1,
             **{"classnames.txt": ["sedan"], TEMPLATES: ["a {c}."]})
    return tmp_path / "moda", tmp_path / "cb"
