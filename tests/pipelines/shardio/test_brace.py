"""Shard lists reach the trainer as brace patterns it expands back to the same list, whatever the count."""

import random

import pytest
from webdataset.shardlists import expand_urls

from pipelines.shardio.brace import compact_shards


def test_a_numbered_folder_of_41000_shards_is_one_pattern_that_expands_to_the_same_list():
    paths = [f"/data/run/split/expert_000/{i:05d}.tar" for i in range(41_000)]
    pattern = compact_shards(paths)
    assert pattern == "/data/run/split/expert_000/{00000..40999}.tar"
    assert expand_urls(pattern) == paths  # what open_clip_train's --train-data parser returns


def test_gaps_widths_folders_and_odd_names_come_back_exactly_in_order():
    rng = random.Random(0)
    for _ in range(200):
        paths = []
        for expert in range(rng.randint(1, 4)):
            numbers = sorted(rng.sample(range(0, 1200), rng.randint(1, 60)))
            width = rng.choice([1, 3, 5])
            paths += [f"/r/expert_{expert:03d}/{n:0{width}d}.tar" for n in numbers]
        paths += rng.sample(["/r/odd/name.tar", "/r/x7/part_3_of.tar", "/r/z/00012.tar.gz", "/r/9"], 2)
        if rng.random() < 0.2:
            rng.shuffle(paths)  # any order is kept, compact or not
        assert expand_urls(compact_shards(paths)) == paths


def test_a_run_stops_where_the_number_would_change_width():
    paths = [f"/r/{n}.tar" for n in range(95, 105)]
    assert compact_shards(paths) == "/r/{95..99}.tar::/r/{100..104}.tar"
    assert expand_urls(compact_shards(paths)) == paths


@pytest.mark.parametrize("bad", ["/r/{a}/0.tar", "/r/a::b/0.tar", "/r/a\\b/0.tar", "/r/${HOME}/0.tar"])
def test_a_path_the_trainer_would_expand_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="rename the folder"):
        compact_shards([bad])
