"""Repeated keys in the assignments are found exactly, in bounded memory, first occurrence kept."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import experts.split.duplicate_keys as dk


def assignments(tmp_path, rows):
    path = tmp_path / "assignments.parquet"
    pq.write_table(pa.table({"key": [k for k, _ in rows], "shard": [s for _, s in rows]}), path,
                   row_group_size=4)
    return path


ROWS = [("a", "s0"), ("b", "s0"), ("a", "s0"),  # a twice in s0: row 2 repeats it
        ("c", "s1"), ("b", "s1"), ("d", "s1"),  # b first seen in s0
        ("e", "s2"), ("c", "s2"), ("c", "s2")]  # c first seen in s1, twice more here


@pytest.mark.parametrize("partition_rows", [dk.PARTITION_ROWS, 2])  # one partition in memory, or spilled
def test_every_later_occurrence_is_found_with_the_shard_of_the_first(tmp_path, partition_rows):
    path = assignments(tmp_path, ROWS)
    rows = dk.duplicate_rows(path, ["s0", "s1", "s2"], tmp_path, partition_rows=partition_rows)
    assert rows == {2: ("a", 0, 0), 4: ("b", 1, 0), 7: ("c", 2, 1), 8: ("c", 2, 1)}
    assert dk.earlier_shard_keys(rows, ["s0", "s1", "s2"]) == {"s1": ["b"], "s2": ["c"]}
    assert not list(tmp_path.glob(f"{dk.SPILL_PREFIX}*"))  # spill files removed


def test_first_means_first_in_the_input_order_not_in_the_file(tmp_path):
    path = assignments(tmp_path, [("x", "late"), ("x", "early")])
    assert dk.duplicate_rows(path, ["early", "late"], tmp_path) == {0: ("x", 1, 0)}


def test_a_hash_collision_never_makes_a_duplicate(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr(dk, "key_hashes", lambda keys: np.zeros(len(keys), dtype=np.uint64))
    path = assignments(tmp_path, ROWS)
    assert dk.duplicate_rows(path, ["s0", "s1", "s2"], tmp_path) == \
        {2: ("a", 0, 0), 4: ("b", 1, 0), 7: ("c", 2, 1), 8: ("c", 2, 1)}


def test_a_shard_missing_from_the_inputs_is_a_clear_error(tmp_path):
    path = assignments(tmp_path, ROWS)
    with pytest.raises(ValueError, match="'s2', which is not among the input shards"):
        dk.duplicate_rows(path, ["s0", "s1"], tmp_path)
