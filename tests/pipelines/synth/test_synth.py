"""The synthetic demo set: img2dataset layout, deterministic, held-out tasks disjoint."""

import hashlib
import io
import json

from pipelines.core.config import SynthConfig
from pipelines.shardio.shards import expand_shards, iter_samples
from pipelines.synth.generate import generate


def image_hashes(folder):
    return {hashlib.sha1(s.files["jpg"]).hexdigest() for p in expand_shards(folder) for s in iter_samples(p)}


def test_layout_matches_img2dataset(tiny_data):
    train = tiny_data / "train"
    assert sorted(p.name for p in train.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert (train / "00000.parquet").is_file() and (train / "00000_stats.json").is_file()
    sample = next(iter_samples(train / "00000.tar"))
    assert set(sample.files) == {"jpg", "txt", "json"}
    meta = json.loads(sample.files["json"])
    assert meta["domain"] in {"shapes", "glyphs", "textures", "scenes"}


def test_every_domain_and_caption_style_occurs(tiny_data):
    metas = [json.loads(s.files["json"]) for p in expand_shards(tiny_data / "train") for s in iter_samples(p)]
    assert {m["domain"] for m in metas} == {"shapes", "glyphs", "textures", "scenes"}
    assert {m["style"] for m in metas} == {"descriptive", "terse", "noisy"}


def test_generation_is_deterministic(tmp_path):
    cfg = SynthConfig(num_train=30, shard_size=30, eval_per_class=1, retrieval_pairs=2, seed=5)
    generate(cfg, tmp_path / "a")
    generate(cfg, tmp_path / "b")
    a = (tmp_path / "a" / "train" / "00000.tar")
    b = (tmp_path / "b" / "train" / "00000.tar")
    assert [s.files for s in iter_samples(a)] == [s.files for s in iter_samples(b)]


def test_held_out_images_never_occur_in_training(tiny_data):
    train = image_hashes(tiny_data / "train")
    for split in ("eval", "val"):
        for task in (tiny_data / split).iterdir():
            assert not train & image_hashes(task), task.name


def images(folder):
    from PIL import Image

    return [Image.open(io.BytesIO(s.files["jpg"])) for p in expand_shards(folder) for s in iter_samples(p)]


def test_no_held_out_image_is_a_near_duplicate_of_a_training_image(tiny_data):
    from pipelines.synth.novelty import Thumbnails

    seen = Thumbnails()
    for image in images(tiny_data / "train"):
        seen.add(image)
    for split in ("eval", "val"):
        for task in sorted((tiny_data / split).iterdir()):
            assert all(seen.is_new(image) for image in images(task)), (split, task.name)


def test_every_domain_draws_new_pictures_not_copies(tmp_path):
    """Scenes were a gradient and a few objects: most draws of a class were the same picture."""
    from pipelines.synth.domains import DOMAINS, SCENES
    from pipelines.synth.generate import _rng
    from pipelines.synth.novelty import Thumbnails

    for domain, make in DOMAINS.items():
        seen, copies = Thumbnails(), 0
        for j in range(150):
            image = make(_rng(0, 9, j), 64, SCENES[0] if domain == "scenes" else None).image
            copies += not seen.is_new(image)
            seen.add(image)
        assert copies == 0, domain


def test_a_failed_task_leaves_no_half_written_task_folder(tmp_path, monkeypatch):
    import pytest

    import pipelines.synth.generate as generator
    from evaluation.tasks import load_tasks

    monkeypatch.setattr(generator, "TRIES", 0)  # every draw "fails"
    cfg = SynthConfig(num_train=20, shard_size=20, eval_per_class=1, val_per_class=0, retrieval_pairs=2)
    with pytest.raises(RuntimeError, match="unlike every training image"):
        generate(cfg, tmp_path / "d")
    assert list((tmp_path / "d" / "eval").iterdir()) == []  # neither a folder nor a temporary one
    assert not (tmp_path / "d" / "synth.json").exists()
    (tmp_path / "d" / "eval" / "broken").mkdir()  # as an older generator left it
    with pytest.raises(ValueError, match="with neither a task.json nor clip_benchmark"):
        load_tasks(tmp_path / "d" / "eval")


def test_classification_tasks_have_class_names_and_templates(tiny_data):
    spec = json.loads((tiny_data / "eval" / "digits" / "task.json").read_text())
    assert spec["kind"] == "classification" and len(spec["classnames"]) == 10
    assert all("{}" in t for t in spec["templates"])


def test_a_training_sample_redrawn_alone_is_the_one_written_so_generation_needs_no_list_of_images(
        tiny_data, tmp_path):
    from pipelines.core.config import load_config
    from pipelines.synth.generate import _draw_train

    from conftest import write_config

    metas = [json.loads(s.files["json"]) for p in expand_shards(tiny_data / "train") for s in iter_samples(p)]
    cfg = load_config(write_config(tmp_path / "tiny.yaml", tmp_path / "data")).synth  # the fixture's config
    for i, meta in enumerate(metas[:20]):
        drawn = _draw_train(cfg, i)
        assert (drawn.domain, drawn.label, drawn.style) == (meta["domain"], meta["label"], meta["style"])
        assert meta["wrong_caption"] or drawn.caption == meta["caption"]
    parquet_rows = sum(json.loads(p.read_text())["count"] for p in (tiny_data / "train").glob("*_stats.json"))
    assert parquet_rows == len(metas)


def test_several_processes_write_the_bytes_one_process_writes(tmp_path):
    cfg = SynthConfig(num_train=50, shard_size=10, eval_per_class=1, val_per_class=1, retrieval_pairs=2,
                      wrong_caption_rate=0.2, seed=3)
    one = generate(cfg, tmp_path / "one", processes=1)
    three = generate(cfg, tmp_path / "three", processes=3)
    assert one == three

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = files(tmp_path / "one"), files(tmp_path / "three")
    assert sorted(a) == sorted(b) and len([n for n in a if n.endswith(".tar")]) >= 5 + 5
    assert [n for n in a if a[n] != b[n]] == []  # shards, parquet, sizes.json, held-out tasks alike
