"""Out-of-cluster copies: a fixed, evenly spread choice per (key, expert), at the rate the thresholds ask."""

import numpy as np
import pytest

from experts.split import ooc
from pipelines.shardio.sample_table import key_bytes


def fnv1a_reference(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) % 2**64
    return h


def test_the_key_hash_is_64_bit_fnv1a_of_the_keys_bytes():
    keys = ["", "a", "foobar", "000123456", "dir/sub/key-é", "x" * 70]
    assert ooc.fnv1a(key_bytes(keys)).tolist() == [fnv1a_reference(k.encode()) for k in keys]
    # published FNV-1a 64 test vectors
    assert ooc.fnv1a(key_bytes(["", "a", "foobar"])).tolist() == [0xCBF29CE484222325, 0xAF63DC4C8601EC8C,
                                                                   0x85944171F73967E8]


def test_each_keys_number_depends_on_the_key_and_expert_alone():
    keys = key_bytes([f"{i:09d}" for i in range(1000)])
    together = ooc.units(ooc.fnv1a(keys)[:, None], np.arange(4)[None, :])
    one_by_one = np.array([[ooc.units(ooc.fnv1a(keys[i:i + 1]), e)[0] for e in range(4)] for i in (0, 17, 999)])
    assert np.array_equal(together[[0, 17, 999]], one_by_one)
    assert ((together >= 0) & (together < 1)).all()


def test_the_numbers_are_spread_evenly_and_independently_across_experts():
    keys = key_bytes([f"{i:09d}" for i in range(200_000)])  # similar keys, as img2dataset names them
    u = ooc.units(ooc.fnv1a(keys)[:, None], np.arange(3)[None, :])
    counts = np.stack([np.histogram(u[:, e], bins=20, range=(0, 1))[0] for e in range(3)])
    assert np.abs(counts / 10_000 - 1).max() < 0.05  # each bin within 5% of 10,000
    assert np.abs(np.corrcoef(u.T)[np.triu_indices(3, 1)]).max() < 0.01


@pytest.mark.parametrize("ratio", [0.02, 0.2])
def test_each_expert_gets_about_ratio_of_its_own_size_and_never_its_own_samples(ratio):
    rng = np.random.default_rng(0)
    own = rng.choice(4, size=100_000, p=[0.4, 0.3, 0.2, 0.1])
    keys = key_bytes([f"k{i}" for i in range(len(own))])
    sizes = np.bincount(own, minlength=4)
    chosen = ooc.copies(keys, own, ooc.thresholds(sizes, ratio))
    assert not chosen[np.arange(len(own)), own].any()
    received = chosen.sum(0)
    assert np.allclose(received, ratio * sizes, rtol=0.1)


def test_verifys_question_for_one_expert_gets_the_answer_the_split_acted_on():
    own = np.arange(30_000) % 3
    keys = key_bytes([f"k{i}" for i in range(len(own))])
    limits = np.array([0.1, 0.3, 0.05])
    chosen = ooc.copies(keys, own, limits)
    for e in range(3):
        others = own != e
        assert np.array_equal(ooc.copied_to(keys, e, limits)[others], chosen[others, e])


def test_no_copies_at_ratio_zero_and_none_for_an_expert_alone():
    assert (ooc.thresholds(np.array([10, 20]), 0.0) == 0).all()
    assert (ooc.thresholds(np.array([30, 0]), 0.5) == [0.0, 0.0]).all()  # no other expert has samples
