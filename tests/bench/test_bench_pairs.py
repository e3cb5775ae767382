"""bench/pairs.py: every benchmark ratio comes from interleaved pairs of alternating order, and
"flat per item" from a line fitted over several sizes."""

from bench.pairs import Ratio, alternate, fit_line, slopes


def test_pairs_alternate_their_order_so_neither_side_always_runs_first():
    calls = []
    done = alternate(lambda r: calls.append(("a", r)) or f"a{r}", lambda r: calls.append(("b", r)) or f"b{r}", 4)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert done == [("a0", "b0"), ("a1", "b1"), ("a2", "b2"), ("a3", "b3")]  # always (a's, b's)


def test_a_ratio_reports_median_and_range_and_says_when_the_range_spans_one():
    ahead = Ratio("x / y", (1.1, 1.3, 1.2, 1.05, 1.15))
    assert (ahead.median, ahead.low, ahead.high) == (1.15, 1.05, 1.3)
    assert not ahead.inside_noise() and "inside the noise" not in str(ahead)
    assert "median 1.15x, range 1.05-1.30x over 5 interleaved pairs" in str(ahead)
    tie = Ratio("x / y", (0.97, 1.04, 1.01))
    assert tie.inside_noise() and str(tie).endswith("inside the noise (the range spans 1)")
    assert tie.as_dict()["pairs"] == 3


def test_a_fixed_cost_lands_in_the_intercept_not_in_the_per_item_cost():
    sizes = [4100, 12300, 41000]
    seconds = [5.0 + 0.002 * n for n in sizes]  # 5 s of imports and a model load, 2 ms a shard
    fixed, per = fit_line(sizes, seconds)
    assert abs(fixed - 5.0) < 1e-9 and abs(per - 0.002) < 1e-12
    assert [round(s, 9) for s in slopes(sizes, seconds)] == [0.002, 0.002]  # flat per shard
    # the ratio of totals per shard would call this 0.79x and hide a cost that grows
    assert (seconds[-1] / 41000) / (seconds[0] / 4100) < 0.8
