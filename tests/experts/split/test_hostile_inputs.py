"""Hostile inputs (#20): shard sets built the way real ones go wrong. Whatever the tar looks like,
no sample reaches an expert without its caption and its image, every sample that enters is
written or rejected with a reason, both split read paths and `moda verify` agree, and a user's
mistake is one line naming the file, not a traceback.

Each case goes through the embed stage's reader (`shard_captions`), a cluster stand-in that
assigns every embedded key, and the real split stage twice (array path, then sample by sample).
"""

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_split import fake_cluster_stage, fake_embed_rejects, image_bytes, published, split_both_ways

from clustering.captions import shard_captions
from experts.split.images import IMAGE_EXTS, clean_image
from experts.split.stage import InputChanged
from experts.split.verify import verify_split
from pipelines.core.config import DataConfig, SplitConfig, TrainConfig
from pipelines.core.layout import shard_id
from pipelines.core.stage import UpstreamChanged
from pipelines.run.stages import run_section
from pipelines.shardio.shards import Sample, expand_shards, iter_samples, read_caption

from conftest import tar_bytes

JPG = image_bytes()


def samples(keys, image=JPG, ext="jpg"):
    """Members of complete samples, each key's files next to each other."""
    return [m for k in keys for m in ((f"{k}.{ext}", image), (f"{k}.txt", f"caption {k}".encode()))]


def by_extension(keys, image=JPG, ext="jpg"):
    """`tar cf x.tar *.jpg *.txt`: every image, then every caption."""
    return [(f"{k}.{ext}", image) for k in keys] + [(f"{k}.txt", f"caption {k}".encode()) for k in keys]


def split_case(tmp_path, monkeypatch, files: dict[str, bytes]) -> dict:
    """Write `files` into in/, embed-read them, assign every embedded key, split both ways; check what
    must hold whatever the input; return the split's counts and rejects."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    shards = expand_shards(folder)
    expert_of_key, shard_of_key, embed_rejects = {}, {}, []
    for shard in shards:
        keys, _, rejects = shard_captions(shard)
        embed_rejects += rejects
        for key in keys:
            if key not in expert_of_key:
                expert_of_key[key] = len(expert_of_key) % 2
                shard_of_key[key] = shard_id(shard)
    fake_cluster_stage(tmp_path / "cluster", expert_of_key, 2, shard_of_key.get)
    fake_embed_rejects(tmp_path / "embed", embed_rejects, shards)

    def split(name):
        root = tmp_path / name
        root.mkdir()
        for stage in ("embed", "cluster"):
            (root / stage).symlink_to(tmp_path / stage)
        return run_section("split", SplitConfig(shard_size=3, min_shards=1, processes=1), root,
                           DataConfig(train_shards=str(folder)))

    fast, slow, _ = split_both_ways(monkeypatch, split)
    assert published(tmp_path / "split_arrays" / "split") == published(tmp_path / "split_samples" / "split")
    assert fast["counts"] == slow["counts"]
    root = tmp_path / "split_arrays"
    counts = fast["counts"]
    rejects = pq.read_table(root / "split" / "rejects.parquet").to_pylist()
    assert counts["samples_in"] == counts["written"] + sum(1 for r in rejects if r["key"])  # conservation
    for e in range(2):
        for path in sorted((root / "split" / f"expert_{e:03d}").glob("*.tar")):
            for sample in iter_samples(path):
                assert "txt" in sample.files and any(x in sample.files for x in IMAGE_EXTS), sample.key
    problems, summary = verify_split(root)
    assert problems == [] and summary["samples_in"] == counts["samples_in"]
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".part" in p.name]
    return {"counts": counts, "rejects": rejects, "written": counts["written"]}


def reasons(case) -> dict:
    return {r["reason"].split(":")[0] if not r["key"] else r["reason"]: 0 for r in case["rejects"]}


# --- member order and files that are not data ---------------------------------------------------

@pytest.mark.parametrize("image, ext", [(JPG, "jpg"), (image_bytes("RGBA", "PNG"), "png")])
def test_a_tar_made_by_extension_gives_whole_samples(tmp_path, monkeypatch, image, ext):
    keys = [f"k{i}" for i in range(7)]
    case = split_case(tmp_path, monkeypatch, {"00000.tar": tar_bytes(by_extension(keys, image, ext))})
    assert case["written"] == 7 and case["rejects"] == []


def test_appledouble_hidden_files_and_directories_are_skipped_and_counted(tmp_path, monkeypatch):
    members = [("d", None)]
    for k in ("a", "b", "c"):
        members += [(f"d/{k}.jpg", JPG), (f"d/._{k}.jpg", b"\x00\x05\x16\x07 mac resource fork"),
                    (f"d/{k}.txt", b"caption " + k.encode())]
    members += [("d/.DS_Store", b"\x00\x00\x00\x01Bud1"), ("__MACOSX/d/._a.jpg", b"\x00\x05")]
    case = split_case(tmp_path, monkeypatch, {"00000.tar": tar_bytes(members)})
    assert case["written"] == 3
    ignored = sorted(r["reason"] for r in case["rejects"] if not r["key"])
    assert len(ignored) == 6 and all(r.startswith("ignored_file: ") for r in ignored)
    assert "ignored_file: d/._a.jpg" in ignored and "ignored_file: d/" in ignored
    assert case["counts"]["rejected"] == {"ignored_file": 6}


def test_a_repeated_key_is_a_duplicate_wherever_its_second_copy_lies(tmp_path, monkeypatch):
    members = samples(["a", "b"]) + [("a.jpg", JPG), ("c.jpg", JPG), ("a.txt", b"again"), ("c.txt", b"c")]
    case = split_case(tmp_path, monkeypatch, {"00000.tar": tar_bytes(members)})
    assert case["written"] == 3 and [r["reason"] for r in case["rejects"]] == ["duplicate_key"]


# --- damage, concatenation, compression ---------------------------------------------------------

def test_every_complete_sample_before_damage_is_kept_and_the_cut_one_named(tmp_path, monkeypatch):
    data = tar_bytes(samples([f"k{i}" for i in range(6)]))
    cut = data.index(b"k3.txt") + 512 + 4  # inside k3's caption payload
    case = split_case(tmp_path, monkeypatch, {"00000.tar": data[:cut]})
    assert case["written"] == 3  # k0, k1, k2 (the last one before the damage too)
    keyed = {r["key"]: r["reason"] for r in case["rejects"] if r["key"]}
    assert keyed == {"k3": "caption:damaged_member"}
    shard_rows = [r["reason"] for r in case["rejects"] if not r["key"]]
    assert len(shard_rows) == 1 and shard_rows[0].startswith("truncated_tar: ") and "00000.tar" in shard_rows[0]


@pytest.mark.parametrize("damage", ["checksum", "huge size"])
def test_a_damaged_header_keeps_the_samples_before_it(tmp_path, monkeypatch, damage):
    data = bytearray(tar_bytes(samples([f"k{i}" for i in range(5)])))
    header = data.index(b"k3.jpg")
    if damage == "checksum":
        data[header + 20] ^= 1
    else:
        data[header + 124:header + 136] = b"77777777777\0"
    case = split_case(tmp_path, monkeypatch, {"00000.tar": bytes(data)})
    assert case["written"] == 3
    assert [r["reason"].split(":")[0] for r in case["rejects"]] == ["truncated_tar"]


def test_tars_joined_with_cat_are_read_to_the_end(tmp_path, monkeypatch):
    joined = tar_bytes(samples(["a", "b"])) + tar_bytes(samples(["c", "d"]))
    case = split_case(tmp_path, monkeypatch, {"00000.tar": joined})
    assert case["written"] == 4 and case["rejects"] == []


@pytest.mark.parametrize("name, compress", [
    ("00000.tar.gz", gzip.compress), ("00000.tgz", gzip.compress), ("00000.tar.bz2", bz2.compress),
    ("00000.tar.xz", lzma.compress), ("00000.tar", lzma.compress),  # xz data under a plain name
])
def test_compressed_tars_are_read_by_their_content(tmp_path, monkeypatch, name, compress):
    case = split_case(tmp_path, monkeypatch, {name: compress(tar_bytes(by_extension(["a", "b", "c"])))})
    assert case["written"] == 3 and case["rejects"] == []


def test_a_cut_gzip_keeps_what_came_out_before_the_cut(tmp_path, monkeypatch):
    data = gzip.compress(tar_bytes(samples([f"k{i}" for i in range(40)], image=bytes(range(256)) * 40)),
                         compresslevel=1)
    case = split_case(tmp_path, monkeypatch, {"00000.tar.gz": data[: len(data) // 2]})
    assert 0 < case["counts"]["samples_in"] < 40
    shard_rows = [r["reason"] for r in case["rejects"] if not r["key"]]
    assert len(shard_rows) == 1 and "gzip stream is cut short" in shard_rows[0]


def test_a_compression_moda_cannot_read_is_named(tmp_path):
    pytest.importorskip("numpy")
    try:
        import zstandard  # noqa: F401
        pytest.skip("zstandard is installed: zstd tars are read")
    except ImportError:
        pass
    (tmp_path / "00000.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(40))
    keys, _, rejects = shard_captions(tmp_path / "00000.tar.zst")
    assert keys == [] and len(rejects) == 1
    assert rejects[0]["reason"].startswith("unreadable_shard: ") and "zstandard" in rejects[0]["reason"]


def test_hidden_tars_and_folders_are_not_shards(tmp_path):
    (tmp_path / "00000.tar").write_bytes(tar_bytes(samples(["a"])))
    (tmp_path / ".00001.tar").write_bytes(tar_bytes(samples(["b"])))  # a copy in progress
    (tmp_path / "sub.tar").mkdir()
    assert expand_shards(tmp_path) == [tmp_path / "00000.tar"]
    assert expand_shards(tmp_path / ".00001.tar") == [tmp_path / ".00001.tar"]  # named: taken
    with pytest.raises(FileNotFoundError, match="sub.tar is a folder, not a tar shard"):
        expand_shards(tmp_path / "sub.tar")
    (tmp_path / "00000.tar.gz").write_bytes(gzip.compress(tar_bytes(samples(["c"]))))
    with pytest.raises(ValueError, match="both shard '00000'"):
        expand_shards(tmp_path)


# --- names and captions -------------------------------------------------------------------------

def test_a_name_that_is_not_utf8_is_a_counted_reject_not_a_stop(tmp_path, monkeypatch):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    members = samples(["a"]) + [(f"{bad}.jpg", JPG), (f"{bad}.txt", b"a cafe")] + samples(["b"])
    data = tar_bytes(members, tarfile.GNU_FORMAT)
    assert b"caf\xe9.jpg" in data
    case = split_case(tmp_path, monkeypatch, {"00000.tar": data})
    assert case["written"] == 2
    assert [(r["key"], r["reason"]) for r in case["rejects"]] == [("caf\\xe9", "caption:non_utf8_name")]


def test_keys_with_dots_follow_webdatasets_rule_and_say_so(tmp_path, monkeypatch):
    members = [("photo.v1.jpg", JPG), ("photo.v1.txt", b"first"), ("photo.v2.jpg", JPG), ("photo.v2.txt", b"x"),
               ("plain.jpg", JPG), ("plain.txt", b"fine")]
    case = split_case(tmp_path, monkeypatch, {"00000.tar": tar_bytes(members)})
    assert case["written"] == 1
    assert [(r["key"], r["reason"]) for r in case["rejects"]] == [("photo", "caption:key_contains_dot")]
    assert clean_image({"v1.jpg": JPG}) == (None, "key_contains_dot")


@pytest.mark.parametrize("raw", [b"\x00\x00\x00", "\u200b\u200c\u200d\ufeff".encode(), " \u00a0\u3000\t".encode(),
                                 "\u2028\x07\x1b".encode()])
def test_a_caption_of_invisible_characters_is_empty(raw):
    assert read_caption(Sample("k", {"txt": raw})) == (None, "empty_caption")


def test_a_caption_with_some_text_keeps_it_as_written():
    assert read_caption(Sample("k", {"txt": "\u200ba cat\n".encode()})) == ("\u200ba cat", None)


# --- inputs changed under the pipeline ----------------------------------------------------------

def test_a_shard_replaced_after_embed_stops_the_split_naming_it(tmp_path, monkeypatch):
    case = split_case(tmp_path, monkeypatch, {"00000.tar": tar_bytes(samples(["a", "b"])),
                                              "00001.tar": tar_bytes(samples(["c", "d"]))})
    assert case["written"] == 4
    (tmp_path / "in" / "00001.tar").write_bytes(tar_bytes(samples(["x", "y"])))
    with pytest.raises(InputChanged, match=r"00001.tar changed since the embed stage read it"):
        run_section("split", SplitConfig(shard_size=3, min_shards=1, processes=1), tmp_path / "split_arrays",
                    DataConfig(train_shards=str(tmp_path / "in")))


@pytest.mark.parametrize("damage", ["edited", "deleted"])
def test_an_expert_shard_changed_after_the_split_stops_the_train_stage_naming_it(tmp_path, monkeypatch, damage):
    split_case(tmp_path, monkeypatch, {"00000.tar": tar_bytes(samples(["a", "b", "c", "d"]))})
    shard = sorted((tmp_path / "split_arrays" / "split").glob("expert_*/*.tar"))[0]
    if damage == "edited":
        shard.write_bytes(shard.read_bytes()[:-512])
    else:
        shard.unlink()
    what = "differs from the sha256 its manifest recorded" if damage == "edited" else "is missing"
    with pytest.raises(UpstreamChanged, match=rf"{shard.parent.name}/{shard.name} {what}.*Rerun the split stage"):
        run_section("train", TrainConfig(), tmp_path / "split_arrays")


# --- images: reasons that say what happened -----------------------------------------------------

def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header says width x height (its CRC fixed up)."""
    raw = bytearray(image_bytes("L", "PNG"))
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    return bytes(raw)


def test_a_huge_png_is_huge_not_corrupt():
    assert clean_image({"png": png_claiming(20000, 20000)}) == (None, "huge_image")


@pytest.mark.parametrize("validate", ["header", "decode"])
def test_bytes_after_the_jpeg_end_marker_are_accepted_as_decoders_accept_them(validate):
    raw = JPG + b"camera trailer \x01\x02" * 4
    assert clean_image({"jpg": raw}, validate) == (raw, None)


def test_verify_opens_every_expert_sample_and_fails_on_one_without_its_caption(tmp_path, monkeypatch):
    split_case(tmp_path, monkeypatch, {"00000.tar": tar_bytes(samples(["a", "b", "c", "d"]))})
    shard = sorted((tmp_path / "split_arrays" / "split" / "expert_000").glob("*.tar"))[0]
    keys = [s.key for s in iter_samples(shard)]
    shard.write_bytes(tar_bytes([(f"{k}.jpg", JPG) for k in keys]))  # captions stripped
    problems, _ = verify_split(tmp_path / "split_arrays")
    assert any("without their caption or image" in p and keys[0] in p for p in problems)


# --- evaluation tasks ---------------------------------------------------------------------------

def task_folder(root: Path, spec, members) -> Path:
    folder = root / "eval" / "t"
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(spec if isinstance(spec, str) else __import__("json").dumps(spec))
    (folder / "00000.tar").write_bytes(tar_bytes(members))
    return root / "eval"


GOOD_SPEC = {"name": "t", "kind": "classification", "classnames": ["cat", "dog"], "templates": ["a {}."]}


@pytest.mark.parametrize("spec, members, message", [
    ("{not json", [("a.jpg", JPG), ("a.cls", b"0")], r"task.json: not valid JSON"),
    ("[1, 2]", [("a.jpg", JPG), ("a.cls", b"0")], r"task.json: must be a JSON object"),
    ({**GOOD_SPEC, "templates": ["a {name}."]}, [("a.jpg", JPG), ("a.cls", b"0")], r"must hold the class name once"),
    ({**GOOD_SPEC, "templates": ["a photo."]}, [("a.jpg", JPG), ("a.cls", b"0")], r"no placeholder"),
    ({**GOOD_SPEC, "classnames": []}, [("a.jpg", JPG), ("a.cls", b"0")], r"classnames must be a non-empty list"),
    (GOOD_SPEC, [("a.jpg", JPG), ("a.cls", b"2")], r"sample 00000.tar:a has class '2'.*0..1"),
    (GOOD_SPEC, [("a.jpg", JPG), ("a.cls", b"-1")], r"sample 00000.tar:a has class '-1'"),
    (GOOD_SPEC, [("a.jpg", b"\xff\xd8 not an image"), ("a.cls", b"0")], r"00000.tar: sample 'a': the image does not"),
    (GOOD_SPEC, [("a.jpg", JPG)], r"00000.tar: sample 'a' needs an image and a .cls"),
])
def test_a_malformed_task_is_an_error_naming_its_file_and_key(tmp_path, spec, members, message):
    from evaluation.tasks import TaskError, load_tasks

    with pytest.raises(TaskError, match=message):
        load_tasks(task_folder(tmp_path, spec, members))


def test_a_clip_benchmark_template_placeholder_is_accepted(tmp_path):
    from evaluation.tasks import load_tasks

    (task,) = load_tasks(task_folder(tmp_path, {**GOOD_SPEC, "templates": ["a photo of a {c}."]},
                                     [("a.jpg", JPG), ("a.cls", b"1")]))
    assert task.labels.tolist() == [1]


# --- clear errors -------------------------------------------------------------------------------

def test_a_full_disk_is_one_line_naming_the_path_and_exit_code_2(tmp_path, monkeypatch, capsys):
    import errno

    import pipelines.run.cli as cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "embed" / "00000.parquet"))

    monkeypatch.setattr(cli, "verify_split", full)
    assert cli.main(["verify", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left writing" in err and "00000.parquet" in err
    assert "GiB free there" in err and "Traceback" not in err
    with pytest.raises(OSError):
        cli.main(["--debug", "verify", str(tmp_path / "run")])


def test_a_write_that_fails_names_the_file_being_written(tmp_path):
    from pipelines.core.manifest import atomic_path
    from pipelines.shardio.tar_write import TarShardWriter

    with pytest.raises(OSError) as caught, atomic_path(tmp_path / "out.json"):
        raise OSError(28, "No space left on device")
    assert caught.value.filename == str(tmp_path / "out.json")
    writer = TarShardWriter("/dev/full")  # every write fails with ENOSPC
    writer.add("000.txt", b"x" * 100)
    with pytest.raises(OSError) as caught:
        writer.close()
    assert caught.value.errno == 28 and caught.value.filename == "/dev/full"


def test_an_image_that_decodes_is_checked_in_both_paths_the_same(tmp_path, monkeypatch):
    """JPEGs with trailing bytes and PNGs claiming huge sizes in a shard: the array path's verdict
    agrees with the sample-by-sample one (split_case compares them)."""
    members = [("a.jpg", JPG + b"trailer"), ("a.txt", b"a"), ("b.png", png_claiming(20000, 20000)),
               ("b.txt", b"b"), ("c.jpg", JPG), ("c.txt", b"c")]
    case = split_case(tmp_path, monkeypatch, {"00000.tar": tar_bytes(members)})
    assert case["written"] == 2 and [(r["key"], r["reason"]) for r in case["rejects"]] == [("b", "huge_image")]
    with Image.open(io.BytesIO(JPG)) as image:
        assert image.size == (16, 16)


def test_the_array_paths_rule_for_files_to_skip_is_the_readers_rule():
    import numpy as np

    from pipelines.shardio.shards import ignorable, ignorable_mask

    names = ["a.jpg", "d/._a.jpg", "._b.txt", ".DS_Store", "d/.DS_Store", "x.DS_Store", "__MACOSX/d/a.jpg",
             "d/.hidden.txt", "Thumbs.db", "d/e.f.txt", "d.x/a.jpg"]
    mask = ignorable_mask(np.array([n.encode() for n in names], dtype="S100"))
    assert mask.tolist() == [ignorable(n) for n in names]
