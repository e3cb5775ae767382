"""`moda infer`: a shard set labelled or embedded, one parquet a shard, resumable, nothing lost."""

import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.core.manifest import file_sha256
from pipelines.shardio.shards import ShardSetWriter, iter_samples
from serving.infer import InferRequest, infer
from serving.predict import MoDESystem

pytestmark = pytest.mark.slow
CLASSES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "a beach", "a forest")


@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory):
    """The tiny training images as 8 shards of 30, with one sample whose image does not decode and
    one with no image at all (in shard 00002)."""
    out = tmp_path_factory.mktemp("infer_shards") / "shards"
    writer = ShardSetWriter(out, 30)
    for i, sample in enumerate(s for shard in sorted((tiny_data / "train").glob("*.tar")) for s in iter_samples(shard)):
        if i == 61:
            writer.write(sample.key, {"jpg": b"not a jpeg", "txt": sample.files["txt"]})
        elif i == 62:
            writer.write(sample.key, {"txt": sample.files["txt"]})
        else:
            writer.write(sample.key, {k: v for k, v in sample.files.items() if k in ("jpg", "txt")})
    writer.close()
    return out


@pytest.fixture(scope="module")
def system(tiny_run):
    return MoDESystem.load(tiny_run["run_dir"])


@pytest.fixture(scope="module")
def labelled(system, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("labelled")
    summary = infer(system, str(shards), out, InferRequest(classes=CLASSES, top_k=3, batch_size=16))
    return out, summary


def images_of(shard):
    return [(s.key, s.files.get("jpg")) for s in iter_samples(shard)]


def test_every_sample_gets_a_row_in_its_shards_parquet_in_the_shards_order(labelled, shards):
    out, summary = labelled
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"{i:05d}.parquet" for i in range(8)]
    for shard in sorted(shards.glob("*.tar")):
        table = pq.read_table(out / f"{shard.stem}.parquet")
        assert table.column("key").to_pylist() == [key for key, _ in images_of(shard)]
    assert summary["rows"] == 240 and summary["shards"] == 8


def test_the_labels_are_the_routed_ensembles_top_k(labelled, system, shards):
    out, _ = labelled
    shard = shards / "00000.tar"
    images = [Image.open(io.BytesIO(raw)).convert("RGB") for _, raw in images_of(shard)]
    probs, weights = system.classify(images, list(CLASSES))
    table = pq.read_table(out / "00000.parquet").to_pydict()
    for row, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")[:3]
        assert table["classes"][row] == [CLASSES[j] for j in order]
        np.testing.assert_allclose(table["scores"][row], p[order], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(table["routing_weights"][row], weights, rtol=1e-6)


def test_unreadable_images_are_rows_with_their_error_counted_and_none_dropped(labelled):
    out, summary = labelled
    table = pq.read_table(out / "00002.parquet").to_pydict()
    errors = {key: error for key, error in zip(table["key"], table["error"]) if error}
    assert len(errors) == 2 and summary["unreadable"] == 2 and summary["per_shard"]["00002.parquet"]["unreadable"] == 2
    assert any("does not decode" in e for e in errors.values()) and any("has no image" in e for e in errors.values())
    assert all(table["classes"][table["key"].index(key)] is None for key in errors)


def test_embed_writes_each_experts_unit_embedding(system, shards, tmp_path):
    summary = infer(system, str(shards / "00000.tar"), tmp_path, InferRequest(embed=True, batch_size=16))
    table = pq.read_table(tmp_path / "00000.parquet")
    images = [Image.open(io.BytesIO(raw)).convert("RGB") for _, raw in images_of(shards / "00000.tar")]
    expected = system.embed(images)
    for name in system.expert_names:
        column = np.array(table.column(name).to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(column, expected[name], atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(column, axis=1), 1.0, atol=1e-5)
    assert summary["mode"] == "embed"


def test_top_experts_runs_only_the_largest_routing_weights_renormalised(system, shards, tmp_path):
    summary = infer(system, str(shards / "00000.tar"), tmp_path, InferRequest(classes=CLASSES, top_experts=1))
    weights = summary["routing"]["weights"]
    assert summary["routing"]["experts_run"] == [max(weights, key=weights.get)]
    images = [Image.open(io.BytesIO(raw)).convert("RGB") for _, raw in images_of(shards / "00000.tar")]
    probs, _ = system.classify(images, list(CLASSES), top_experts=1)
    table = pq.read_table(tmp_path / "00000.parquet").to_pydict()
    assert [row[0] for row in table["classes"]] == [CLASSES[j] for j in probs.argmax(axis=1)]


def test_a_rerun_skips_what_is_done_and_another_class_list_redoes_it(labelled, system, shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(labelled[0], out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = infer(system, str(shards), out, InferRequest(classes=CLASSES, top_k=3, batch_size=16))
    assert again["shards_skipped_as_done"] == 8
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before
    other = infer(system, str(shards / "00000.tar"), out, InferRequest(classes=CLASSES[:4], top_k=3))
    assert other["shards_skipped_as_done"] == 0


def test_a_missing_shard_is_an_error_or_with_skip_counted_and_named(system, shards, tmp_path):
    spec = f"{shards}/{{00000..00008}}.tar"  # 00008 does not exist
    with pytest.raises(FileNotFoundError, match="1 shard"):
        infer(system, spec, tmp_path, InferRequest(classes=CLASSES))
    summary = infer(system, spec, tmp_path, InferRequest(classes=CLASSES, missing_shards="skip"))
    assert summary["missing_shards"] == [str(shards / "00008.tar")] and summary["shards"] == 8


def test_a_request_without_exactly_one_mode_is_refused():
    with pytest.raises(ValueError, match="exactly one of --classes"):
        InferRequest().check()
    with pytest.raises(ValueError, match="--top-experts routes by a class list"):
        InferRequest(embed=True, top_experts=1).check()


def infer_command(run_dir, shards, out, classes):
    return [sys.executable, "-m", "pipelines.run.cli", "infer", str(run_dir), str(shards), "--out", str(out),
            "--classes", str(classes), "--batch-size", "4", "--workers", "0"]


def test_a_killed_infer_resumes_with_the_uninterrupted_runs_bytes(tiny_run, system, shards, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    whole = tmp_path / "whole"  # the uninterrupted run, in this process (the same request as the command's)
    infer(system, str(shards), whole, InferRequest(classes=CLASSES, batch_size=4, workers=0))
    cut = tmp_path / "cut"
    proc = subprocess.Popen(infer_command(tiny_run["run_dir"], shards, cut, classes),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (cut / "00001.parquet").exists():  # killed once work is done
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = sorted(p.name for p in cut.glob("*.parquet"))
    assert 0 < len(done_at_kill) < 8, done_at_kill  # the kill landed after some shards and before the end
    assert not (cut / "infer.json").exists()
    subprocess.run(infer_command(tiny_run["run_dir"], shards, cut, classes), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = sorted(p.name for p in whole.glob("*.parquet"))
    assert sorted(p.name for p in cut.glob("*.parquet")) == files
    assert {f: file_sha256(cut / f) for f in files} == {f: file_sha256(whole / f) for f in files}
    assert not [p for p in cut.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_infer_reads_shards_from_s3_as_from_disk(system, shards, labelled, s3, tmp_path):
    from conftest import upload

    upload(s3, shards, "evalsets/infer")
    out = tmp_path / "from_s3"
    summary = infer(system, "s3://evalsets/infer", out, InferRequest(classes=CLASSES, top_k=3, batch_size=16))
    assert summary["rows"] == 240 and summary["unreadable"] == 2
    local, _ = labelled
    for name in ("00000.parquet", "00002.parquet"):
        remote, disk = pq.read_table(out / name), pq.read_table(local / name)
        assert remote.drop_columns(["error"]).equals(disk.drop_columns(["error"]))
        errors = [e for e in remote.column("error").to_pylist() if e]  # the same samples, named by their URL
        assert len(errors) == (2 if name == "00002.parquet" else 0)
        assert all(e.startswith("s3://evalsets/infer/00002.tar: sample") for e in errors)
