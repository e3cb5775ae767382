"""A shard that the training pattern names but that is not there (img2dataset leaves a few unwritten
at LAION size): skipped, counted and named by default; a clear error before any work on request."""

import pytest

from pipelines.core.config import load_config
from pipelines.run.stages import check_inputs, run_stage
from pipelines.shardio.shards import expand_shards, select_shards
from pipelines.synth.generate import generate

from conftest import write_config


@pytest.fixture(scope="module")
def gappy(tmp_path_factory):
    """120 synthetic pairs in 4 shards, the third deleted, named by a brace range over all four."""
    root = tmp_path_factory.mktemp("gappy")
    data = root / "data"
    config = write_config(root / "c.yaml", data,
                          synth={"num_train": 120, "shard_size": 30, "eval_per_class": 1, "retrieval_pairs": 4},
                          cluster={"num_fine": 4, "num_experts": 2, "niter": 5},
                          split={"shard_size": 20, "min_shards": 1})
    generate(load_config(config).synth)
    (data / "train" / "00002.tar").unlink()
    pattern = str(data / "train" / "{00000..00003}.tar")
    return root, config, pattern


def test_an_absent_shard_in_a_brace_range_is_skipped_by_default_and_refused_on_request(gappy):
    _, _, pattern = gappy
    found, missing = select_shards(pattern, "skip")
    assert [p.name for p in found] == ["00000.tar", "00001.tar", "00003.tar"]
    assert missing == [pattern.replace("{00000..00003}", "00002")]
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) not found.*00002.tar.*data.missing_shards: skip"):
        expand_shards(pattern, "error")


def test_a_pattern_none_of_whose_shards_exist_is_an_error_whatever_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="none of the 3 shards named exist"):
        expand_shards(str(tmp_path / "{0..2}.tar"), "skip")


def test_error_mode_stops_the_run_before_any_work(gappy):
    root, config, pattern = gappy
    cfg = load_config(config, overrides={"data": {"train_shards": pattern, "missing_shards": "error"}})
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        check_inputs(cfg)


@pytest.mark.slow
def test_a_run_over_a_gap_names_the_shard_in_its_manifests_and_conserves_every_present_sample(gappy):
    root, config, pattern = gappy
    cfg = load_config(config, overrides={"data": {"train_shards": pattern}})
    run = root / "run"
    embed = run_stage("embed", cfg, run)
    run_stage("cluster", cfg, run)
    split = run_stage("split", cfg, run)
    absent = [pattern.replace("{00000..00003}", "00002")]
    assert embed["missing_shards"] == absent and embed["counts"]["shards_missing"] == 1
    assert split["missing_shards"] == absent and split["counts"]["shards_missing"] == 1
    assert split["counts"]["shards_in"] == 3
    assert embed["counts"]["samples_in"] == split["counts"]["samples_in"] == 90  # 3 shards of 30
    assert split["counts"]["samples_in"] == split["counts"]["written"] + sum(split["counts"]["rejected"].values())
