"""Stage 3: per-expert shards that lose nothing and that open_clip_train reads."""

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from experts.shard_sets import shard_set
from experts.split.images import clean_image, sample_output, sample_outputs
from experts.split.verify import verify_split
from pipelines.core.config import DataConfig, SplitConfig
from pipelines.core.layout import shard_id
from pipelines.core.manifest import atomic_path, file_sha256, hash_outputs, write_manifest
from pipelines.run.stages import run_section
from pipelines.shardio.shards import Sample, ShardSetWriter, iter_samples, write_rejects


def expert_shards(split_dir, expert):
    return shard_set(split_dir / f"expert_{expert:03d}")


def shards_spec(shards):
    """A data spec naming exactly these shards of one folder."""
    folder = shards[0].parent
    assert all(p.parent == folder for p in shards)
    if sorted(shards) == sorted(folder.glob("*.tar")):
        return str(folder)
    return str(shards[0]) if len(shards) == 1 else f"{folder}/{{{','.join(p.name for p in shards)}}}"


def run_split(cfg, shards, embed_dir, cluster_dir, split_dir):
    """The split stage alone on these shards. A `split_dir` not named split is a run folder of its
    own that shares the embed and cluster stages (linked), its split in split_dir/split."""
    root = split_dir.parent
    if split_dir.name != "split":
        root = split_dir
        root.mkdir(exist_ok=True)
        for stage in (embed_dir, cluster_dir):
            if not (root / stage.name).exists():
                os.symlink(stage, root / stage.name)
    return run_section("split", cfg, root, DataConfig(train_shards=shards_spec(shards)))


def image_bytes(mode="RGB", fmt="JPEG", size=(16, 16)):
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode in ("L", "I;16") else None).save(buf, format=fmt)
    return buf.getvalue()


def fake_cluster_stage(stage_dir, expert_of_key, num_experts, shard_of_key):
    """assignments.parquet + manifest, as run_cluster writes them."""
    stage_dir.mkdir(parents=True)
    table = pa.table({"key": list(expert_of_key), "shard": [shard_of_key(k) for k in expert_of_key],
                      "fine": [0] * len(expert_of_key), "expert": list(expert_of_key.values())})
    with atomic_path(stage_dir / "assignments.parquet") as tmp:
        pq.write_table(table, tmp)
    write_manifest(stage_dir, stage="cluster", fingerprint="f" * 16, config_hash="x", inputs={},
                   outputs=hash_outputs(stage_dir, [stage_dir / "assignments.parquet"]), counts={},
                   started=time.time(), extra={"num_experts": num_experts})


def fake_embed_rejects(stage_dir, rejects, shards=None):
    """rejects.parquet + manifest, as the embed stage writes them, with the sha256 of the input shards
    it read (by default every tar in the folder `in` beside it): the split checks them."""
    stage_dir.mkdir(parents=True)
    write_rejects(stage_dir / "rejects.parquet", rejects)
    shards = sorted((stage_dir.parent / "in").glob("*.tar")) if shards is None else shards
    write_manifest(stage_dir, stage="embed", fingerprint="e" * 16, config_hash="x",
                   inputs={shard_id(p): file_sha256(p) for p in shards},
                   outputs=hash_outputs(stage_dir, [stage_dir / "rejects.parquet"]), counts={},
                   started=time.time())


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"),
                                       ("RGB", "PNG"), ("P", "PNG")])
def test_odd_but_valid_images_become_rgb_jpeg(mode, fmt):
    out, reason = clean_image({"png" if fmt == "PNG" else "jpg": image_bytes(mode, fmt)})
    assert reason is None
    with Image.open(io.BytesIO(out)) as im:
        assert (im.format, im.mode) == ("JPEG", "RGB")


@pytest.mark.parametrize("validate", ["header", "decode"])
def test_a_truncated_jpeg_is_rejected_in_both_validation_modes(validate):
    raw = image_bytes(size=(64, 64))
    assert clean_image({"jpg": raw[: len(raw) * 2 // 3]}, validate) == (None, "corrupt_image")


def test_decode_mode_rejects_damage_that_the_header_check_lets_through():
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG")
    good = buf.getvalue()
    # a stray start-of-image marker inside the scan data: header and end marker intact
    raw = good[: len(good) // 2] + b"\xff\xd8" + good[len(good) // 2:]
    assert clean_image({"jpg": raw}, "header") == (raw, None)
    assert clean_image({"jpg": raw}, "decode")[1] == "corrupt_image"


def test_rgb_jpeg_passes_through_unchanged():
    raw = image_bytes()
    assert clean_image({"jpg": raw}) == (raw, None)


@pytest.mark.parametrize("validate", ["header", "decode"])
def test_images_decoded_on_several_threads_come_back_in_order_with_the_serial_answers(validate):
    good, png = image_bytes(size=(64, 48)), image_bytes("RGBA", "PNG", size=(40, 40))
    kinds = [{"jpg": good}, {"png": png}, {"jpg": b"\xff\xd8\xff garbage"}, {"jpg": image_bytes("CMYK")},
             {"jpg": good[: len(good) // 2]}, {}, {"png": image_bytes("I;16", "PNG")}]
    samples = [Sample(f"k{i}", {**kinds[i % len(kinds)], "txt": b"c%d" % i}) for i in range(60)]
    serial = [sample_output(sample, validate) for sample in samples]
    assert sample_outputs(samples, validate, threads=4) == serial
    assert sample_outputs(samples, validate, threads=1) == serial
    assert {reason for _, reason in serial} == {None, "corrupt_image", "missing_image"}


def test_the_shard_wide_jpeg_verdict_agrees_with_clean_image_or_leaves_it_the_image():
    from experts.split.images import HUGE, PASS, UNSETTLED, plain_jpeg_verdicts

    good = image_bytes()
    images = [good, huge_jpeg(), good[: len(good) // 2], image_bytes("CMYK"), good + b"\n", b"", b"\x89PNG"]
    data = np.frombuffer(b"".join(images) + bytes(8), np.uint8)
    sizes = np.array([len(i) for i in images])
    verdicts = plain_jpeg_verdicts(data, np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes).tolist()
    assert verdicts == [PASS, HUGE] + [UNSETTLED] * 5
    assert clean_image({"jpg": images[0]}) == (images[0], None)
    assert clean_image({"jpg": images[1]}) == (None, "huge_image")


@pytest.fixture
def corrupted_input(tmp_path):
    """Two input shards with every bad case, and the upstream stages' files."""
    good = image_bytes()
    w = ShardSetWriter(tmp_path / "in", shard_size=1000)
    cases = {
        "ok0": {"jpg": good, "txt": b"a"}, "ok1": {"jpg": image_bytes("L", "PNG"), "txt": b"b"},
        "ok2": {"jpg": good, "txt": b"c"}, "corrupt": {"jpg": b"\xff\xd8\xff garbage", "txt": b"d"},
        "truncjpg": {"jpg": good[: len(good) // 2], "txt": b"e"}, "zero": {"jpg": b"", "txt": b"f"},
        "noimage": {"txt": b"g"}, "nocaption": {"jpg": good}, "emptycap": {"jpg": good, "txt": b" "},
        "huge": {"jpg": huge_jpeg(), "txt": b"h"}, "nonutf8": {"jpg": good, "txt": b"\xff\xfe caption"},
        "cmyk": {"jpg": image_bytes("CMYK"), "txt": b"i"}, "rgba": {"png": image_bytes("RGBA", "PNG"), "txt": b"j"},
        "grey16": {"png": image_bytes("I;16", "PNG"), "txt": b"k"},
    }
    for key, files in cases.items():
        w.write(key, files)
    w.write("ok0", {"jpg": good, "txt": b"dup"})  # duplicate key
    w.close()
    # second shard, truncated after a few samples
    w2 = ShardSetWriter(tmp_path / "in2", shard_size=1000)
    for i in range(30):
        w2.write(f"t{i:02d}", {"jpg": good, "txt": b"x" * 3000})
    w2.close()
    second = tmp_path / "in" / "00001.tar"
    data = (tmp_path / "in2" / "00000.tar").read_bytes()
    second.write_bytes(data[: len(data) // 2])
    surviving = [s.key for s in _readable(second)]
    expert_of_key = {k: i % 2 for i, k in enumerate(["ok0", "ok1", "ok2", "corrupt", "truncjpg", "zero", "noimage",
                                                      "huge", "cmyk", "rgba", "grey16"] + surviving)}
    fake_cluster_stage(tmp_path / "cluster", expert_of_key, 2,
                       lambda k: "00001" if k[1:].isdigit() else "00000")
    fake_embed_rejects(tmp_path / "embed", [{"key": "nocaption", "shard": "00000", "reason": "missing_caption"},
                                            {"key": "emptycap", "shard": "00000", "reason": "empty_caption"},
                                            {"key": "nonutf8", "shard": "00000", "reason": "non_utf8_caption"}])
    return tmp_path, [tmp_path / "in" / "00000.tar", second], len(surviving)


def huge_jpeg():
    """A small RGB JPEG whose frame header says 9000 x 9000 pixels (over MAX_PIXELS)."""
    raw = bytearray(image_bytes())
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5:sof + 9] = (9000).to_bytes(2, "big") * 2
    return bytes(raw)


def _readable(path):
    out = []
    try:
        for s in iter_samples(path):
            out.append(s)
    except Exception:
        pass
    return out


def test_conservation_and_counts_by_reason(corrupted_input):
    root, shards, surviving = corrupted_input
    manifest = run_split(SplitConfig(shard_size=4), shards, root / "embed", root / "cluster", root / "split")
    counts = manifest["counts"]
    assert counts["rejected"] == {
        "corrupt_image": 2, "empty_image": 1, "missing_image": 1, "caption:missing_caption": 1,
        "caption:empty_caption": 1, "caption:non_utf8_caption": 1, "huge_image": 1, "duplicate_key": 1,
        "truncated_tar": 1,
    }
    samples_in = 15 + surviving
    assert counts["samples_in"] == samples_in
    assert sum(counts["experts"]) + 9 == samples_in
    keys = []
    for e in range(2):
        paths, sizes = expert_shards(root / "split", e)
        got = [s.key for p in paths for s in iter_samples(p)]
        assert len(got) == sum(sizes.values())
        keys += got
    assert len(keys) == len(set(keys))  # no duplicates
    assert set(keys) == {"ok0", "ok1", "ok2", "cmyk", "rgba", "grey16"} | {f"t{i:02d}" for i in range(surviving)}
    rejects = pq.read_table(root / "split" / "rejects.parquet").to_pylist()
    assert len([r for r in rejects if r["key"]]) == 9  # one row per rejected sample
    assert [r["reason"].split(":")[0] for r in rejects if not r["key"]] == ["truncated_tar"]
    problems, summary = verify_split(root)  # the same account, from the files alone
    assert problems == [] and summary["truncated_inputs"] == 1 and summary["rejected"] == 9
    for path in expert_shards(root / "split", 0)[0] + expert_shards(root / "split", 1)[0]:
        for sample in iter_samples(path):  # odd but valid images were converted, not dropped
            with Image.open(io.BytesIO(sample.files["jpg"])) as image:
                assert (image.format, image.mode) == ("JPEG", "RGB")


def test_expert_manifests_hash_their_shards(corrupted_input):
    root, shards, _ = corrupted_input
    run_split(SplitConfig(shard_size=4), shards, root / "embed", root / "cluster", root / "split")
    from pipelines.core.manifest import file_sha256

    m = json.loads((root / "split" / "expert_000" / "manifest.json").read_text())
    for name, digest in m["shards_sha256"].items():
        assert file_sha256(root / "split" / "expert_000" / name) == digest
    assert m["samples"] == sum(m["sizes"].values())


def test_rerun_with_same_inputs_is_skipped(corrupted_input):
    root, shards, _ = corrupted_input
    first = run_split(SplitConfig(shard_size=4), shards, root / "embed", root / "cluster", root / "split")
    again = run_split(SplitConfig(shard_size=4), shards, root / "embed", root / "cluster", root / "split")
    assert again["skipped"] and again["outputs"] == first["outputs"]
    assert not (root / "split" / ".partial").exists()


# ---------------------------------------------------------------- on real upstream stages


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 1), (3, 1), (8, 4), (64, 10)])
def test_by_default_a_split_process_is_started_per_two_cores_and_never_more_than_shards(monkeypatch, cores,
                                                                                       expected):
    from experts.split.plan import input_runs as _chunks

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    shards = [Path(f"{i:05d}.tar") for i in range(10)]
    chunks = _chunks(shards, 0)
    assert len(chunks) == expected and sum(chunks, []) == shards
    assert len(_chunks(shards, 3)) == 3  # a number given is taken as it is


def test_samples_that_need_no_change_are_copied_as_they_lie_and_the_rest_rebuilt(tmp_path):
    """Input from another tar writer (GNU format, real mtimes): plain jpg/txt/json samples keep their
    exact bytes; a converted image or a long-name key gets fresh ustar members; tarfile reads all."""
    import tarfile

    long_key = "k" * 120
    samples = [("a", {"jpg": image_bytes(), "txt": b"one", "json": b"{}"}),
               ("b", {"jpg": image_bytes("L", "PNG"), "txt": b"two"}),
               (long_key, {"jpg": image_bytes(), "txt": b"three"}),
               ("c", {"jpg": image_bytes(), "txt": b"four"})]
    (tmp_path / "in").mkdir()
    shard = tmp_path / "in" / "00000.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.uname = len(data), 1_700_000_000, "crawler"
                tar.addfile(info, io.BytesIO(data))
    raw = {s.key: bytes(s.raw) for s in iter_samples(shard, views=True) if s.raw is not None}
    assert set(raw) == {"a", "b", "c"}
    fake_cluster_stage(tmp_path / "cluster", {key: 0 for key, _ in samples}, 1, lambda k: "00000")
    fake_embed_rejects(tmp_path / "embed", [])
    run_split(SplitConfig(shard_size=10, min_shards=1), [shard], tmp_path / "embed", tmp_path / "cluster",
              tmp_path / "split")
    (out,), _ = expert_shards(tmp_path / "split", 0)
    written = out.read_bytes()
    assert raw["a"] in written and raw["c"] in written  # passed through, headers and all
    assert raw["b"] not in written  # its PNG became a JPEG
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar}
        assert members["a.jpg"].mtime == 1_700_000_000 and members[f"{long_key}.jpg"].mtime == 0
        assert tar.extractfile(members[f"{long_key}.txt"]).read() == b"three"
        with Image.open(io.BytesIO(tar.extractfile(members["b.jpg"]).read())) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
    assert [s.key for s in iter_samples(out)] == ["a", "b", long_key, "c"]


def test_a_key_in_two_input_shards_is_kept_once_and_the_later_copy_counted(tmp_path):
    w = ShardSetWriter(tmp_path / "in", shard_size=3)
    order = ["a", "b", "c", "d", "a", "e"]  # "a" again in the second shard
    for key in order:
        w.write(key, {"jpg": image_bytes(), "txt": key.encode()})
    w.close()
    shards = sorted((tmp_path / "in").glob("*.tar"))
    (tmp_path / "cluster").mkdir()
    pq.write_table(pa.table({"key": order, "shard": ["00000"] * 3 + ["00001"] * 3, "fine": [0] * 6,
                             "expert": [0, 1, 0, 1, 1, 0]}), tmp_path / "cluster" / "assignments.parquet")
    write_manifest(tmp_path / "cluster", stage="cluster", fingerprint="f" * 16, config_hash="x", inputs={},
                   outputs={}, counts={}, started=time.time(), extra={"num_experts": 2})
    fake_embed_rejects(tmp_path / "embed", [])
    counts = run_split(SplitConfig(shard_size=2, min_shards=1), shards, tmp_path / "embed", tmp_path / "cluster",
                       tmp_path / "split")["counts"]
    assert counts["samples_in"] == 6 and counts["rejected"] == {"duplicate_key": 1}
    written = {e: [s.key for p in expert_shards(tmp_path / "split", e)[0] for s in iter_samples(p)] for e in (0, 1)}
    assert sorted(written[0] + written[1]) == ["a", "b", "c", "d", "e"]
    assert "a" in written[0]  # the first one's expert, not the repeat's
    from experts.split.verify import verify_split

    assert verify_split(tmp_path)[0] == []


def published(split_dir):
    """What a split publishes: every expert file's bytes, and the rejects."""
    return {str(p.relative_to(split_dir)): p.read_bytes() for p in sorted(split_dir.glob("expert_*/*"))} | \
        {"rejects": pq.read_table(split_dir / "rejects.parquet").to_pylist()}


def split_both_ways(monkeypatch, split):
    """Run `split(dest)` with the array path for plain tars, then sample by sample; how many
    shards took the array path."""
    import experts.split.shard as module

    taken = []
    array_path = module._split_plain

    def recorded(tar, table, shard, *rest):
        taken.append(shard)
        return array_path(tar, table, shard, *rest)

    monkeypatch.setattr(module, "_split_plain", recorded)
    fast = split("split_arrays")
    monkeypatch.setattr(module, "index_plain_tar", lambda path: None)  # every tar read sample by sample
    slow = split("split_samples")
    return fast, slow, taken


@pytest.mark.parametrize("validate", ["header", "decode"])
def test_the_array_path_writes_what_the_sample_by_sample_path_writes(corrupted_input, monkeypatch, validate):
    import experts.split.stage as module

    monkeypatch.setattr(module, "usable_cores", lambda: 4)  # the array path decodes on 4 threads
    root, shards, _ = corrupted_input
    fast, slow, taken = split_both_ways(monkeypatch, lambda name: run_split(
        SplitConfig(shard_size=2, ooc_ratio=0.5, processes=1, validate=validate), shards, root / "embed",
        root / "cluster", root / name))
    assert taken == ["00000"]  # the intact shard; the truncated one is read sample by sample
    assert published(root / "split_arrays" / "split") == published(root / "split_samples" / "split")
    assert fast["counts"] == slow["counts"] and fast["outputs"] == slow["outputs"]


def test_assignment_rows_stream_each_shards_rows_in_one_pass(tmp_path, monkeypatch):
    """Rows in shard order are read once, in batches smaller than a shard's rows, across row groups;
    rows out of order make the plan give no ranges, and each shard's rows are found by a filter."""
    import experts.split.rows as module
    from experts.split.plan import make_plan
    from experts.split.rows import AssignmentRows

    monkeypatch.setattr(module, "BATCH_ROWS", 3)
    shards = ["a", "b", "c", "d"]
    rows_of = {"a": 5, "b": 0, "c": 7, "d": 2}  # "b" has none
    keys = [f"{s}{i}" for s in shards for i in range(rows_of[s])]
    table = pa.table({"key": keys, "shard": [k[0] for k in keys], "fine": [0] * len(keys),
                      "expert": [i % 2 for i in range(len(keys))]})
    path = tmp_path / "assignments.parquet"
    pq.write_table(table, path, row_group_size=4)
    plan = make_plan(path, shards, 2, SplitConfig(), workdir=tmp_path)
    assert plan["assignment_rows"] == {"a": [0, 5], "b": [5, 5], "c": [5, 12], "d": [12, 14]}
    reader = AssignmentRows(path, plan["assignment_rows"])
    for shard in ["a", "b", "c", "d"]:
        assert reader.of(shard).column("key").to_pylist() == [k for k in keys if k[0] == shard]
    assert reader.of("d").column("expert").to_pylist() == [0, 1]  # asked again: read again

    shuffled = table.take([13, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    pq.write_table(shuffled, path)
    plan = make_plan(path, shards, 2, SplitConfig(), workdir=tmp_path)
    assert plan["assignment_rows"] is None
    reader = AssignmentRows(path, None)
    assert reader.of("d").column("key").to_pylist() == ["d1", "d0"]


def test_the_out_of_cluster_hash_is_part_of_the_fingerprint_only_when_copies_are_made(monkeypatch):
    """A plan made with another OOC hash would give slots to other samples: such a split is redone."""
    from experts.split import ooc
    from experts.split.stage import split_config_hash

    with_copies, without = SplitConfig(ooc_ratio=0.02), SplitConfig()
    before = split_config_hash(with_copies), split_config_hash(without)
    monkeypatch.setattr(ooc, "HASH", "another hash")
    assert split_config_hash(with_copies) != before[0]
    assert split_config_hash(without) == before[1]
